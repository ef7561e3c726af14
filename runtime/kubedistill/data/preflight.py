"""Tokenizer-pair preflight: can this student learn from this teacher token by token?

:func:`tokenizer_report` describes one tokenizer: its vocabulary size (``len(tokenizer)``)
against the model's embedding rows (``vocab_size`` in the model's ``config.json`` when the
model directory has one), bos/eos/pad tokens and ids, whether it adds BOS/EOS itself, the
sha256 of its chat template and how it renders a short chat. :func:`pair_report` compares
student and teacher:

- ``same_vocab``: identical token -> id maps (then the teacher's logits and the student's
  index the same tokens, which same-vocabulary algorithms such as ``vanilla_kd`` need);
- ``vocab_overlap``: shares of *normalised* tokens found on the other side, where the
  byte-level BPE alphabet (``Ġ`` space, ``Ċ`` newline, ...) and the SentencePiece marker
  ``▁`` / byte tokens ``<0x0A>`` are mapped back to plain text first, so the two families
  compare on the strings they stand for;
- ``special_tokens``: the teacher id of each of the student's bos/eos/pad strings;
- ``same_chat_template``, ``adds_bos`` of each side, and warnings.

:func:`check_algorithm` raises ConfigError when a same-vocabulary algorithm is given a pair
whose vocabularies differ, naming the cross-tokenizer algorithms instead.
:func:`load_pair` loads the tokenizers of a run (reused while their files are unchanged) and
runs all of the above.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from kubedistill.config import Config
from kubedistill.crosstok.vocab import byte_decoder, is_byte_level
from kubedistill.data.masks import adds_special, template_hash
from kubedistill.errors import ConfigError
from kubedistill.models.loading import tokenizer_files_hash

log = logging.getLogger(__name__)
SAME_VOCAB_ALGORITHMS = ("vanilla_kd",)
CROSS_TOKENIZER_ALGORITHMS = ("simple_ctkd", "dskd")


def embedding_rows(model_dir: str | None) -> int | None:
    """``vocab_size`` from ``{model_dir}/config.json`` (or its ``text_config``), if any."""
    path = os.path.join(model_dir, "config.json") if model_dir else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if value else None


def tokenizer_report(tokenizer: Any, name: str, model_dir: str | None = None) -> dict[str, Any]:
    bos, eos = adds_special(tokenizer)
    rows = embedding_rows(model_dir)
    return {
        "name": name, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
        "embedding_rows": rows, "adds_bos": bos, "adds_eos": eos,
        "bos_token": tokenizer.bos_token, "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "chat_template_hash": template_hash(tokenizer),
        "chat_template_example": _example(tokenizer),
    }


def _example(tokenizer: Any) -> str | None:
    """How the chat template renders a one-exchange chat (None without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a broken template is reported, not fatal here
        return f"<template error: {exc}>"


def normalised_vocab(tokenizer: Any) -> set[str]:
    """The token strings as the text they stand for (see the module docstring)."""
    out = set()
    byte_level = is_byte_level(tokenizer)
    decoder = byte_decoder()
    for token in tokenizer.get_vocab():
        if byte_level and all(ch in decoder for ch in token):
            text = bytes(decoder[ch] for ch in token).decode("utf-8", errors="replace")
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            text = bytes([int(token[3:5], 16)]).decode("utf-8", errors="replace")
        else:
            text = token.replace("▁", " ")
        out.add(text)
    return out


def pair_report(student: Any, teacher: Any, student_info: dict[str, Any],
                teacher_info: dict[str, Any]) -> dict[str, Any]:
    """Compare two tokenizers (see the module docstring)."""
    same_vocab = student is teacher or len(student) == len(teacher) and (
        student.get_vocab() == teacher.get_vocab())
    report: dict[str, Any] = {"student": student_info, "teacher": teacher_info,
                              "same_vocab": same_vocab, "warnings": []}
    if same_vocab:
        report["vocab_overlap"] = {"student_in_teacher": 1.0, "teacher_in_student": 1.0}
    else:
        s_norm, t_norm = normalised_vocab(student), normalised_vocab(teacher)
        common = len(s_norm & t_norm)
        report["vocab_overlap"] = {
            "common": common, "student_in_teacher": round(common / max(1, len(s_norm)), 4),
            "teacher_in_student": round(common / max(1, len(t_norm)), 4)}
    t_vocab = student.get_vocab() if student is teacher else teacher.get_vocab()
    report["special_tokens"] = {
        kind: {"student": getattr(student, f"{kind}_token"),
               "teacher_id": t_vocab.get(getattr(student, f"{kind}_token") or "")}
        for kind in ("bos", "eos", "pad")}
    report["same_chat_template"] = (student_info["chat_template_hash"]
                                    == teacher_info["chat_template_hash"])
    report["same_tokenizer"] = bool(same_vocab and report["same_chat_template"] and all(
        student_info[k] == teacher_info[k] for k in ("adds_bos", "adds_eos", "bos_token",
                                                     "eos_token")))
    for side in (student_info, teacher_info):
        rows = side["embedding_rows"]
        if rows is not None and rows < side["vocab_size"]:
            report["warnings"].append(f"{side['name']}: tokenizer has {side['vocab_size']} "
                                      f"tokens but the model only {rows} embedding rows")
    if (same_vocab and student_info["embedding_rows"] and teacher_info["embedding_rows"]
            and student_info["embedding_rows"] != teacher_info["embedding_rows"]):
        report["warnings"].append("student and teacher share a vocabulary but have different "
                                  "numbers of embedding rows (padding); compare the first "
                                  f"{min(student_info['embedding_rows'], teacher_info['embedding_rows'])}")
    if not report["same_chat_template"]:
        report["warnings"].append("student and teacher chat templates differ; the teacher "
                                  "gets its own tokenization")
    return report


def check_algorithm(report: dict[str, Any], algorithm: str) -> None:
    """Refuse a same-vocabulary algorithm for a pair whose vocabularies differ."""
    if algorithm in SAME_VOCAB_ALGORITHMS and not report["same_vocab"]:
        s, t = report["student"], report["teacher"]
        raise ConfigError(
            f"kd_algorithm '{algorithm}' needs the student and teacher to share a tokenizer, "
            f"but {s['name']} ({s['vocab_size']} tokens) and {t['name']} ({t['vocab_size']} "
            f"tokens) differ (normalised vocabulary overlap "
            f"{report['vocab_overlap']['student_in_teacher']:.1%}); use a cross-tokenizer "
            f"algorithm: --kd_algorithm {' or '.join(CROSS_TOKENIZER_ALGORITHMS)}")


def log_report(report: dict[str, Any]) -> None:
    s, t = report["student"], report["teacher"]
    log.info("tokenizer preflight: student %s (%d tokens, %s embedding rows, adds_bos=%s) | "
             "teacher %s (%d tokens, %s embedding rows, adds_bos=%s)", s["name"],
             s["vocab_size"], s["embedding_rows"], s["adds_bos"], t["name"], t["vocab_size"],
             t["embedding_rows"], t["adds_bos"])
    log.info("tokenizer preflight: same vocabulary=%s, overlap s->t %.1f%% t->s %.1f%%, "
             "same chat template=%s, specials %s", report["same_vocab"],
             100 * report["vocab_overlap"]["student_in_teacher"],
             100 * report["vocab_overlap"]["teacher_in_student"], report["same_chat_template"],
             json.dumps(report["special_tokens"]))
    for warning in report["warnings"]:
        log.warning("tokenizer preflight: %s", warning)


# ---- loading the pair ---------------------------------------------------------------------
@dataclass
class TokenizerPair:
    """The student's tokenizer and, when a teacher takes part, the teacher's.

    ``teacher`` is the same object as ``student`` when both come from one reference.
    ``report`` is the preflight (None without a teacher).
    """

    student: Any
    student_ref: str
    student_dir: str
    teacher: Any | None = None
    teacher_ref: str | None = None
    teacher_dir: str | None = None
    student_info: dict[str, Any] | None = None
    teacher_info: dict[str, Any] | None = None
    report: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        out = {"student": [self.student_ref, tokenizer_files_hash(self.student_dir)]}
        if self.teacher_dir:
            out["teacher"] = [self.teacher_ref, tokenizer_files_hash(self.teacher_dir)]
        return out


def load_pair(cfg: Config) -> TokenizerPair:
    """Load the tokenizers a run needs, run the preflight, refuse impossible pairs.

    The student's tokenizer comes from ``student_name_or_path``, else from the teacher (a
    student derived with ``student_from_teacher_layers`` shares it). There is no teacher
    for ``kd_algorithm: sft``; with ``self_distillation`` the teacher is the student.
    """
    from kubedistill.models import resolve_model_path

    m, cache = cfg.model, cfg.storage.model_cache_dir
    student_ref = m.student_name_or_path or m.teacher_name_or_path
    if not student_ref:
        raise ConfigError("prepare needs a tokenizer: set student_name_or_path or "
                          "teacher_name_or_path")
    teacher_ref = None
    if cfg.kd.kd_algorithm != "sft" and m.teacher_name_or_path:
        teacher_ref = student_ref if cfg.kd.self_distillation else m.teacher_name_or_path
    options = (cache, not m.disable_fast_tokenizer, m.trust_remote_code)
    student_dir = resolve_model_path(student_ref, cache)
    pair = TokenizerPair(_load(student_ref, student_dir, *options), student_ref, student_dir)
    pair.student_info = tokenizer_report(pair.student, student_ref, _dir(student_dir))
    if teacher_ref is None:
        return pair
    pair.teacher_ref, pair.teacher_dir = teacher_ref, resolve_model_path(teacher_ref, cache)
    pair.teacher = (pair.student if teacher_ref == student_ref
                    else _load(teacher_ref, pair.teacher_dir, *options))
    pair.teacher_info = (pair.student_info if pair.teacher is pair.student else
                         tokenizer_report(pair.teacher, teacher_ref, _dir(pair.teacher_dir)))
    pair.report = pair_report(pair.student, pair.teacher, pair.student_info, pair.teacher_info)
    log_report(pair.report)
    check_algorithm(pair.report, cfg.kd.kd_algorithm)
    return pair


def _load(ref: str, model_dir: str, cache_dir: str | None, use_fast: bool,
          trust_remote_code: bool) -> Any:
    """Load a tokenizer, reusing one already loaded from the same unchanged files."""
    return _load_cached(ref, tokenizer_files_hash(model_dir), cache_dir, use_fast,
                        trust_remote_code)


@functools.lru_cache(maxsize=4)
def _load_cached(ref: str, files_hash: str, cache_dir: str | None, use_fast: bool,
                 trust_remote_code: bool) -> Any:
    from kubedistill.models import load_tokenizer

    return load_tokenizer(ref, cache_dir=cache_dir, use_fast=use_fast,
                          trust_remote_code=trust_remote_code)


def _dir(path: str) -> str | None:
    return path if os.path.isdir(path) else None
