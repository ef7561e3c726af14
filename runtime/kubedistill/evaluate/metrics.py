"""Pure metric functions of the evaluate stage (no model, no I/O).

- ROUGE-L F1 (Lin, 2004) on lower-cased alphanumeric word tokens::

      P = LCS(c, r) / |c|     R = LCS(c, r) / |r|     F1 = 2PR / (P + R)   (0 if LCS = 0)

- GSM8K exact match: the final number of a text is the one after ``####`` if present, else the
  last number in the text; commas, ``$`` and a trailing ``.`` are ignored; two numbers match
  when they are equal as decimals (``72 == 72.0``).
- Exact match (short answers, e.g. visual question answering): the two texts' ROUGE word
  tokens (lower-cased ``[a-z0-9]`` runs) are equal, so case, punctuation and spacing are
  ignored (``"A lion." == "a lion"``).
- Perplexity is ``exp(CE)`` with CE the mean per-token cross-entropy in nats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of ``[a-z0-9]`` (everything else separates words)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` (see module doc), in [0, 1]."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def _to_decimal(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(cleaned)
    except (InvalidOperation, ValueError):
        return None


def extract_number(text: str | None) -> str | None:
    """The final number of ``text`` (after ``####`` if present, else the last one), normalised
    (no commas or ``$``; ``72.0`` stays ``72.0``), or None when there is none."""
    if not text:
        return None
    final = _FINAL.search(text)
    found = final.group(1) if final else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    value = _to_decimal(found)
    return None if value is None else str(value)


def numbers_match(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    da, db = _to_decimal(a), _to_decimal(b)
    return da is not None and db is not None and da == db


def gsm8k_correct(output: str, label: str | None) -> bool:
    """Exact match of the final number of ``output`` with ``label`` (itself parsed the same
    way, so a label may be ``"72"`` or a worked answer ending in ``#### 72``)."""
    return numbers_match(extract_number(output), extract_number(label))


def looks_numeric(labels: Iterable[str | None]) -> bool:
    """True when most non-empty labels are a single number (GSM8K-style answers)."""
    values = [x for x in labels if x not in (None, "")]
    if not values:
        return False
    numeric = sum(_to_decimal(str(v)) is not None for v in values)
    return numeric >= 0.8 * len(values)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal word tokens (see module doc); an empty reference matches nothing."""
    ref = rouge_tokens(reference)
    return bool(ref) and rouge_tokens(candidate) == ref


SHORT_ANSWER_WORDS = 3


def looks_short(references: Iterable[str | None]) -> bool:
    """True when at least 80% of the non-empty references have at most
    :data:`SHORT_ANSWER_WORDS` words (short answers, not captions)."""
    values = [rouge_tokens(x) for x in references if x]
    if not values:
        return False
    return sum(len(v) <= SHORT_ANSWER_WORDS for v in values) >= 0.8 * len(values)


def resolve_task(task: str, labels: Iterable[str | None],
                 references: Iterable[str | None] = ()) -> str:
    """``auto`` -> ``gsm8k`` if the labels look numeric, else ``exact_match`` if the reference
    responses are short (:func:`looks_short`), else ``rouge``; others pass through."""
    if task != "auto":
        return task
    if looks_numeric(labels):
        return "gsm8k"
    return "exact_match" if looks_short(references) else "rouge"


def perplexity(ce: float) -> float:
    """``exp(ce)``; ``inf`` on overflow."""
    try:
        return math.exp(ce)
    except OverflowError:
        return math.inf


# metric name -> higher is better (for the keys the evaluate stage writes)
METRIC_DIRECTIONS: dict[str, bool] = {
    "eval_ce": False, "eval_ppl": False, "eval_kl": False, "eval_top1_agreement": True,
    "eval_accuracy": True, "eval_rouge_l": True, "eval_exact_match": True, "eval_task_score": True,
}
