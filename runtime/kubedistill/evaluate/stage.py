"""The evaluate stage: held-out metrics of the trained student and a teacher baseline.

``evaluate(cfg) -> dict`` reads ``{prepared_path}/eval.parquet`` (docs/contracts.md) and the
model at ``cfg.train.save_path`` and writes, under ``{work_dir}/eval/``:

- ``metrics.json``: ``eval_ce`` / ``eval_ppl`` (student, target tokens); ``eval_kl``
  (KL(teacher || student) per compared token, temperature 1), ``eval_top1_agreement``,
  ``eval_kl_tokens`` (the compared tokens) and ``eval_kl_space``
  (:mod:`~kubedistill.evaluate.teacher_signal`): ``full_vocab`` when the teacher reads the
  student's tokens (every target, full vocabulary); ``shared_vocab_aligned`` for
  cross-tokenizer data (``ct_align`` rows + ``vocab_map.safetensors``): the aligned pairs,
  both distributions renormalised over the K shared ids of the map, as simple_ctkd trains.
  The signal comes from the teacher cache if it holds the eval ids and was built from this
  teacher, else from a live teacher. The task metric on the first ``eval_num_generations``
  prompts (greedy, ``eval_max_new_tokens``): ``eval_accuracy`` (gsm8k), ``eval_rouge_l``
  (rouge) or ``eval_exact_match`` (exact_match), also as ``eval_task_score``; the teacher's ``teacher_eval_*``; ``score`` =
  metrics[eval_metric], ``score_metric``, ``higher_is_better``, ``eval_data_hash``,
  ``data_hash``.
  Written last, it marks the stage complete; an earlier run's copy is removed when the stage
  starts, so a killed run leaves none.
- ``generations.jsonl``: id, prompt, reference, student_output, teacher_output, correct
  (gsm8k; None for rouge), rouge_l (rouge).
- ``teacher_baseline-<key>.json``: the teacher's scores, computed once per teacher weights +
  ``eval_data_hash`` and reused.

Image rows (the prepared ``images`` column; :mod:`~kubedistill.evaluate.vision`): an
image-text student and teacher each read the images through their own processor (from their
model directories), with their own positions, in every forward (CE, KL/top-1 from a live
teacher, the teacher baseline) and in generation; ``eval_image_samples`` / ``eval_images``
count them. Cross-tokenizer pairs with images are refused.

``eval_data_hash`` covers the eval split file AND the protocol (task, number of generations,
max new tokens), so two scores with the same hash are comparable. For the metrics above the
direction is known (``METRIC_DIRECTIONS``); ``eval_higher_is_better`` applies to other keys.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.crosstok.vocab import VOCAB_MAP_FILE, VocabMap
from kubedistill.errors import ConfigError, DataError
from kubedistill.evaluate import metrics as M
from kubedistill.evaluate.generation import greedy_generate
from kubedistill.evaluate.model_dir import is_adapter_dir, load_model
from kubedistill.evaluate.scoring import TokenStats, make_batches, target_hidden, token_ce
from kubedistill.evaluate.teacher_signal import CacheSignal, LiveSignal, open_cache_signal
from kubedistill.evaluate.vision import EvalImages
from kubedistill.teacher.head import TeacherHead

log = logging.getLogger(__name__)
BATCH_TOKENS = int(os.environ.get("KUBEDISTILL_EVAL_BATCH_TOKENS", "4096"))
GEN_BATCH = 8


def _device(cfg: Config) -> tuple[str, torch.dtype]:
    want = cfg.train.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    dtype = torch.bfloat16 if (cfg.train.bf16 and device.startswith("cuda")) else torch.float32
    return device, dtype


def read_eval_rows(cfg: Config) -> tuple[list[dict[str, Any]], str]:
    """The eval split as a list of dicts and the sha256 of its file."""
    uri = storage.join(cfg.prepared_path, "eval.parquet")
    if not storage.exists(uri):
        raise DataError(f"{uri} does not exist; run the prepare stage first")
    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    keep = [c for c in ("id", "input_ids", "loss_mask", "prompt_len", "teacher_input_ids",
                        "teacher_loss_mask", "teacher_prompt_len", "ct_align", "response",
                        "label", "images")
            if c in table.column_names]
    rows = table.select(keep).to_pylist()
    if not rows:
        raise DataError(f"{uri} has no rows")
    return rows, storage.sha256_file(uri)


def eval_data_hash(file_sha: str, task: str, cfg: Config) -> str:
    proto = {"file": file_sha, "task": task, "n_gen": cfg.eval.eval_num_generations,
             "max_new_tokens": cfg.eval.eval_max_new_tokens}
    return storage.sha256_bytes(json.dumps(proto, sort_keys=True).encode())[:16]


def _teacher_ids(row: dict) -> tuple[list[int], list[int], int]:
    if row.get("teacher_input_ids") is not None:
        return row["teacher_input_ids"], row["teacher_loss_mask"], row["teacher_prompt_len"]
    return row["input_ids"], row["loss_mask"], row["prompt_len"]


def _task_scores(task: str, outputs: list[str], rows: list[dict]) -> tuple[list, str, float]:
    """Per-row scores, the metric name and its mean for ``task`` (gsm8k | exact_match |
    rouge)."""
    if task == "gsm8k":
        per = [M.gsm8k_correct(o, r.get("label") or r.get("response")) for o, r in
               zip(outputs, rows, strict=True)]
        return per, "eval_accuracy", sum(per) / max(len(per), 1)
    if task == "exact_match":
        per = [M.exact_match(o, r.get("label") or r.get("response") or "") for o, r in
               zip(outputs, rows, strict=True)]
        return per, "eval_exact_match", sum(per) / max(len(per), 1)
    per = [M.rouge_l(o, r.get("response") or "") for o, r in zip(outputs, rows, strict=True)]
    return per, "eval_rouge_l", sum(per) / max(len(per), 1)


def _baseline_key(teacher_ref: str, teacher_dir: str, data_hash: str) -> str:
    try:
        from kubedistill.teacher.key import weights_hash

        weights = weights_hash(teacher_dir)
    except Exception:  # the key helper is optional here; fall back to names and sizes
        weights = json.dumps(sorted((f, os.path.getsize(os.path.join(teacher_dir, f)))
                                    for f in os.listdir(teacher_dir)))
    blob = json.dumps({"teacher": teacher_ref, "weights": weights, "eval": data_hash})
    return storage.sha256_bytes(blob.encode())[:16]


def teacher_baseline(cfg: Config, rows: list[dict], task: str, data_hash: str, teacher,
                     tokenizer, device: str, images: EvalImages | None = None
                     ) -> dict[str, Any]:
    """The teacher's CE/perplexity on its own tokens (and, with ``images``, the rows' images
    through its own processor) and its task metric + generations."""
    ids, masks = zip(*[(t[0], t[1]) for t in map(_teacher_ids, rows)], strict=True)
    pad = tokenizer.pad_token_id or 0
    batches = make_batches(ids, masks, BATCH_TOKENS, pad)
    ce, n = token_ce(teacher, tqdm(batches, desc="teacher CE", leave=False), device, images)
    out: dict[str, Any] = {"teacher_eval_ce": ce, "teacher_eval_ppl": M.perplexity(ce),
                           "teacher_eval_tokens": float(n), "generations": {}}
    gen_rows = rows[:cfg.eval.eval_num_generations] if task != "none" else []
    if gen_rows:
        prompts = [_teacher_ids(r)[0][:_teacher_ids(r)[2]] for r in gen_rows]
        texts = _generate(teacher, tokenizer, prompts, images, cfg, device, "teacher generate")
        _, name, mean = _task_scores(task, texts, gen_rows)
        out["teacher_" + name] = out["teacher_eval_task_score"] = mean
        out["generations"] = {r["id"]: t for r, t in zip(gen_rows, texts, strict=True)}
    return out


def _vocab_map(cfg: Config, rows: list[dict]) -> VocabMap | None:
    """The prepared vocabulary map when the eval rows are cross-tokenizer (``ct_align``)."""
    if all(r.get("ct_align") is None for r in rows):
        return None
    uri = storage.join(cfg.prepared_path, VOCAB_MAP_FILE)
    if not storage.exists(uri):
        raise DataError(f"the eval split has ct_align rows but {uri} does not exist")
    return VocabMap.load(cfg.prepared_path)


def _generate(model, tokenizer, prompts: list, images: EvalImages | None, cfg: Config,
              device: str, desc: str) -> list[str]:
    """Greedy continuations of the first ``len(prompts)`` eval rows' prompts."""
    if images is not None:
        return images.generate(model, tokenizer, prompts, list(range(len(prompts))),
                               max_new_tokens=cfg.eval.eval_max_new_tokens,
                               batch_size=GEN_BATCH)
    return greedy_generate(model, tokenizer, prompts, batch_size=GEN_BATCH, device=device,
                           max_new_tokens=cfg.eval.eval_max_new_tokens, desc=desc)


def _images_for(model_dir: str, rows: list[dict], cfg: Config,
                base_ref: str | None = None) -> EvalImages | None:
    """The eval rows' images for the model at ``model_dir`` (LoRA adapters: their base's
    processor) or None for a text model."""
    if is_adapter_dir(model_dir) and base_ref:
        from kubedistill.models import resolve_model_path

        model_dir = resolve_model_path(base_ref, cfg.storage.model_cache_dir)
    return EvalImages.for_model(model_dir, rows, trust_remote_code=cfg.model.trust_remote_code)


def _score_student(student, rows: list[dict], signal: CacheSignal | LiveSignal | None,
                   pad: int, device: str, images: EvalImages | None = None) -> TokenStats:
    head = TeacherHead.from_model(student)
    stats = TokenStats()
    batches = make_batches([r["input_ids"] for r in rows], [r["loss_mask"] for r in rows],
                           BATCH_TOKENS, pad)
    for batch in tqdm(batches, desc="student CE/KL", leave=False):
        hidden, targets, brow = target_hidden(student, batch, device, images)
        t_logits, keep = signal.logits(batch, rows, brow) if signal else (None, None)
        stats.add(head, hidden, targets, brow, t_logits, keep,
                  signal.student_cols if signal else None)
    return stats


@torch.inference_mode()
def evaluate(cfg: Config) -> dict[str, Any]:
    """Run the stage (see module doc); returns the metrics dict written to metrics.json."""
    from kubedistill.tracking import make_tracker

    tracker = make_tracker(cfg, "evaluate")
    status = "FAILED"
    try:
        result = _evaluate(cfg, tracker)
        status = "FINISHED"
        return result
    finally:
        tracker.close(status)


def _evaluate(cfg: Config, tracker) -> dict[str, Any]:
    device, dtype = _device(cfg)
    rows, file_sha = read_eval_rows(cfg)
    task = M.resolve_task(cfg.eval.eval_task, (r.get("label") for r in rows),
                          (r.get("response") for r in rows))
    data_hash = eval_data_hash(file_sha, task, cfg)
    out_dir = storage.join(cfg.storage.work_dir, "eval")
    metrics_uri = storage.join(out_dir, "metrics.json")
    _drop_stale(metrics_uri)
    load_kw = {"device": device, "dtype": dtype, "cache_dir": cfg.storage.model_cache_dir,
               "attn_implementation": cfg.model.attn_implementation}

    teacher_ref = cfg.model.teacher_name_or_path
    baseline: dict[str, Any] | None = None
    signal: CacheSignal | LiveSignal | None = None
    if teacher_ref:
        from kubedistill.models import resolve_model_path

        teacher_dir = resolve_model_path(teacher_ref, cfg.storage.model_cache_dir)
        base_uri = storage.join(out_dir, "teacher_baseline-"
                                f"{_baseline_key(teacher_ref, teacher_dir, data_hash)}.json")
        baseline = storage.read_json(base_uri) if storage.exists(base_uri) else None
        vocab_map = _vocab_map(cfg, rows)
        if vocab_map is not None and any(r.get("images") for r in rows):
            raise ConfigError("cross-tokenizer evaluation with images is not supported: the "
                              "alignment does not cover image blocks")
        signal = open_cache_signal(cfg.teacher_cache_path, rows, teacher_dir, vocab_map)
        if baseline is None or signal is None:
            teacher, t_tok, _ = load_model(teacher_ref, **load_kw)
            t_images = _images_for(teacher_dir, rows, cfg)
            if baseline is None:
                baseline = teacher_baseline(cfg, rows, task, data_hash, teacher, t_tok, device,
                                            t_images)
                storage.write_json_atomic(base_uri, baseline)
            if signal is None:
                signal = LiveSignal(teacher, device, vocab_map, t_images)
            else:
                del teacher

    student, tok, student_dir = load_model(cfg.train.save_path,
                                           base_ref=cfg.model.student_name_or_path, **load_kw)
    images = _images_for(student_dir, rows, cfg, cfg.model.student_name_or_path)
    stats = _score_student(student, rows, signal, tok.pad_token_id or 0, device, images)
    metrics: dict[str, Any] = stats.means()
    if "eval_ce" not in metrics:
        raise DataError("the eval split has no target tokens (loss_mask is all zero)")
    metrics["eval_ppl"] = M.perplexity(metrics["eval_ce"])
    metrics["eval_samples"] = float(len(rows))
    if images is not None:
        metrics["eval_image_samples"] = float(sum(bool(r.get("images")) for r in rows))
        metrics["eval_images"] = float(sum(len(r.get("images") or ()) for r in rows))
    if "eval_kl" in metrics:
        metrics["eval_kl_space"] = signal.space

    gen_rows = rows[:cfg.eval.eval_num_generations] if task != "none" else []
    per: list = []
    texts: list[str] = []
    if gen_rows:
        texts = _generate(student, tok, [r["input_ids"][:r["prompt_len"]] for r in gen_rows],
                          images, cfg, device, "student generate")
        per, name, mean = _task_scores(task, texts, gen_rows)
        metrics[name] = metrics["eval_task_score"] = mean
        metrics["eval_generations"] = float(len(gen_rows))
    if baseline:
        metrics.update({k: v for k, v in baseline.items() if k != "generations"})

    if cfg.eval.eval_metric not in metrics:
        raise ConfigError(f"eval_metric '{cfg.eval.eval_metric}' was not computed; available: "
                          f"{', '.join(sorted(k for k in metrics if k.startswith('eval_')))}")
    higher = M.METRIC_DIRECTIONS.get(cfg.eval.eval_metric, cfg.eval.eval_higher_is_better)
    metrics.update({
        "score": float(metrics[cfg.eval.eval_metric]), "score_metric": cfg.eval.eval_metric,
        "higher_is_better": higher, "eval_data_hash": data_hash, "eval_task": task,
        "teacher_signal": signal.kind if signal else "none",
        "data_hash": _prepared_data_hash(cfg), "model": cfg.train.save_path,
    })
    teacher_texts = (baseline or {}).get("generations", {})
    table = []
    for i, (r, text) in enumerate(zip(gen_rows, texts, strict=True)):
        table.append({
            "id": r["id"], "prompt": tok.decode(r["input_ids"][:r["prompt_len"]],
                                                skip_special_tokens=False),
            "reference": r.get("label") if task == "gsm8k" else r.get("response"),
            "images": len(r.get("images") or ()),
            "response": r.get("response"), "student_output": text,
            "teacher_output": teacher_texts.get(r["id"]),
            "correct": bool(per[i]) if task in ("gsm8k", "exact_match") else None,
            "rouge_l": per[i] if task == "rouge" else None})
    storage.write_bytes_atomic(storage.join(out_dir, "generations.jsonl"),
                               "".join(json.dumps(t) + "\n" for t in table).encode())
    storage.write_json_atomic(metrics_uri, metrics)  # last: the stage's completion marker
    _log(tracker, metrics, table)
    log.info("evaluate: %s = %.4f (%s)", cfg.eval.eval_metric, metrics["score"],
             "higher is better" if higher else "lower is better")
    return metrics


def _drop_stale(metrics_uri: str) -> None:
    """Remove an earlier run's metrics.json: while this run works (or after it is killed)
    no score may look complete for a model it has not scored."""
    if storage.exists(metrics_uri):
        fs, path = storage.filesystem(metrics_uri)
        fs.rm(path)


def _prepared_data_hash(cfg: Config) -> str | None:
    uri = storage.join(cfg.prepared_path, "manifest.json")
    try:
        return storage.read_json(uri).get("data_hash") if storage.exists(uri) else None
    except (OSError, ValueError):
        return None


def _log(tracker, metrics: dict[str, Any], table: list[dict]) -> None:
    import tempfile

    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.set_tags({"eval_data_hash": metrics["eval_data_hash"],
                      "score_metric": metrics["score_metric"]})
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("metrics.json", json.dumps(metrics, indent=2)),
                           ("generations.jsonl", "".join(json.dumps(t) + "\n" for t in table))):
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(data)
            tracker.log_artifact(path, "eval")
