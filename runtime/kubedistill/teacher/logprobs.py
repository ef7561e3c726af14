"""Per-token top-k log-probabilities as inference servers return them, read into one form.

Every reader turns one record into ``Alternatives``: ``tokens`` (the sequence's token ids,
or None when the shape does not carry them) and ``at``: a dict ``i -> [(token_id,
logprob), ...]``, the teacher's candidates for token ``i`` given tokens ``< i``
(the distribution at position ``i - 1``). Shapes (one JSON object / Parquet row each):

- **vLLM** ``prompt_logprobs`` (``SamplingParams(prompt_logprobs=k)``):
  ``{"prompt_token_ids": [...], "prompt_logprobs": [null, {"<id>": {"logprob": x,
  "rank": r, "decoded_token": s} | x, ...}, ...]}``; entry ``i`` is for token ``i`` and
  also holds token ``i`` itself when it is outside the top-k (dropped here: the k largest
  are kept).
- **SGLang** ``return_logprob=True, top_logprobs_num=k, logprob_start_len=0``:
  ``{"input_ids": [...], "meta_info": {"input_top_logprobs": [null, [[x, id, text], ...],
  ...]}}`` (``input_top_logprobs`` may also be top level); entry ``i`` is for token ``i``.
- **OpenAI-compatible** ``logprobs=true, top_logprobs=k`` (chat completions):
  ``{"logprobs": {"content": [{"token": t, "logprob": x, "top_logprobs": [{"token": t,
  "logprob": x}, ...]}, ...]}}``: ``content`` covers the LAST ``len(content)`` tokens of the
  sequence (the completion), entry ``j`` for token ``T - len(content) + j``. Tokens are
  ``"token_id:<id>"`` (vLLM's ``return_tokens_as_token_ids``) or strings of the teacher's
  vocabulary (mapped with the tokenizer; an unknown string is an error). Each entry's own
  ``token`` is checked against the prepared token (alignment).

:func:`select_topk` then picks, for each loss position ``p`` (predicting token ``p + 1``),
the ``k`` largest log-probs in descending order (ties keep the record's order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kubedistill.errors import DataError

FORMATS = ("vllm", "sglang", "openai")


@dataclass
class Alternatives:
    tokens: list[int] | None
    at: dict[int, list[tuple[int, float]]]
    tail_aligned: bool = False  # openai: ``at`` indexes are counted from the end


def detect_format(record: dict) -> str:
    if "prompt_logprobs" in record:
        return "vllm"
    if "input_top_logprobs" in record or "input_top_logprobs" in (record.get("meta_info") or {}):
        return "sglang"
    if isinstance(record.get("logprobs"), dict) and "content" in record["logprobs"]:
        return "openai"
    raise ValueError("no per-token logprobs found (expected a 'prompt_logprobs', "
                     "'input_top_logprobs' or 'logprobs.content' field)")


def vllm_alternatives(record: dict, token_id: Callable[[str], int]) -> Alternatives:
    at = {}
    for i, entry in enumerate(record["prompt_logprobs"]):
        if not entry:
            continue
        at[i] = [(int(tid), float(v["logprob"] if isinstance(v, dict) else v))
                 for tid, v in entry.items()]
    tokens = record.get("prompt_token_ids")
    return Alternatives(None if tokens is None else [int(t) for t in tokens], at)


def sglang_entries(entries: Sequence) -> dict[int, list[tuple[int, float]]]:
    """SGLang's ``input_top_logprobs`` (per token: None or ``[(logprob, id, text), ...]``)
    -> ``{i: [(id, logprob), ...]}``."""
    return {i: [(int(e[1]), float(e[0])) for e in entry]
            for i, entry in enumerate(entries) if entry}


def sglang_alternatives(record: dict, token_id: Callable[[str], int]) -> Alternatives:
    meta = record.get("meta_info") or {}
    entries = record.get("input_top_logprobs", meta.get("input_top_logprobs"))
    tokens = record.get("input_ids", record.get("prompt_token_ids"))
    return Alternatives(None if tokens is None else [int(t) for t in tokens],
                        sglang_entries(entries))


def openai_alternatives(record: dict, token_id: Callable[[str], int]) -> Alternatives:
    content = record["logprobs"]["content"]
    at, own = {}, []
    for j, entry in enumerate(content):  # index j counted from the end: -len(content) + j
        own.append(token_id(entry["token"]))
        at[j - len(content)] = [(token_id(t["token"]), float(t["logprob"]))
                                for t in entry.get("top_logprobs") or []]
    alt = Alternatives(None, at, tail_aligned=True)
    alt.own_tokens = own  # type: ignore[attr-defined]
    return alt


READERS = {"vllm": vllm_alternatives, "sglang": sglang_alternatives,
           "openai": openai_alternatives}


def openai_token_id(vocab: dict[str, int]) -> Callable[[str], int]:
    """``"token_id:123"`` -> 123; else the token string looked up in ``vocab``."""
    def lookup(token: str) -> int:
        if isinstance(token, str) and token.startswith("token_id:"):
            return int(token.split(":", 1)[1])
        if token in vocab:
            return int(vocab[token])
        raise ValueError(f"token {token!r} is not in the teacher's vocabulary (serve with "
                         f"return_tokens_as_token_ids, or check the tokenizer)")
    return lookup


def align(alt: Alternatives, tokens: np.ndarray, where: str) -> dict[int, list]:
    """Check ``alt`` against the prepared teacher ``tokens``; ``at`` keyed by token index."""
    n = len(tokens)
    if alt.tail_aligned:
        own = alt.own_tokens  # type: ignore[attr-defined]
        if len(own) > n:
            raise DataError(f"{where}: logprobs.content has {len(own)} entries for a "
                            f"{n}-token prepared sequence")
        for j, tok in enumerate(own):
            i = n - len(own) + j
            if tok != int(tokens[i]):
                raise DataError(f"{where}: logprobs.content[{j}].token is id {tok}, the "
                                f"prepared token {i} is {int(tokens[i])} (tokenizer or chat "
                                f"template mismatch)")
        return {n + i: v for i, v in alt.at.items()}
    if alt.tokens is not None:
        given = np.asarray(alt.tokens, dtype=np.int64)
        m = min(len(given), n)
        differ = np.flatnonzero(given[:m] != np.asarray(tokens[:m], dtype=np.int64))
        if len(given) != n or len(differ):
            first = int(differ[0]) if len(differ) else m
            raise DataError(f"{where}: token ids differ from the prepared teacher tokens at "
                            f"position {first} ({len(alt.tokens)} vs {n} tokens; tokenizer "
                            f"or chat template mismatch)")
    return alt.at


def select_topk(at: dict[int, list[tuple[int, float]]], positions: np.ndarray, k: int,
                where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [n, k] float32, ids [n, k] long) at loss ``positions`` (position ``p``
    reads the candidates for token ``p + 1``), the k largest, descending."""
    lps = np.zeros((len(positions), k), np.float32)
    ids = np.zeros((len(positions), k), np.int64)
    for r, p in enumerate(positions.tolist()):
        cands = at.get(p + 1)
        if not cands or len(cands) < k:
            raise DataError(f"{where}: token {p + 1} (a loss target) has "
                            f"{len(cands or [])} top logprobs, {k} needed")
        order = sorted(range(len(cands)), key=lambda j: -cands[j][1])[:k]  # stable
        ids[r] = [cands[j][0] for j in order]
        lps[r] = [cands[j][1] for j in order]
    return torch.from_numpy(lps), torch.from_numpy(ids)
