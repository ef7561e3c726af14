"""The evaluate stage on tiny models: CE/perplexity against a direct computation, KL and top-1
against the teacher (zero / one when the teacher IS the student), cache and live teacher
signals agree, the teacher baseline is computed once and reused, outputs are written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubedistill.config import Config
from kubedistill.models import load_causal_lm, load_tokenizer

QA = [("What is 2 + 3?", "2 + 3 = 5.\n#### 5", "5"),
      ("Tom has 4 apples and eats 1. How many are left?", "4 - 1 = 3.\n#### 3", "3"),
      ("What is 6 times 7?", "6 * 7 = 42.\n#### 42", "42"),
      ("A box holds 12 eggs. How many eggs are in 2 boxes?", "12 * 2 = 24.\n#### 24", "24"),
      ("What is 10 minus 4?", "10 - 4 = 6.\n#### 6", "6"),
      ("Name a colour.", "Blue is a colour.", None)]


def eval_rows(tokenizer, qa=QA) -> list[dict]:
    """Rows of the prepared-split schema (docs/contracts.md) built with the chat template."""
    rows = []
    for i, (question, answer, label) in enumerate(qa):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}],
                                             tokenize=True)
        prompt = list(getattr(prompt, "input_ids", prompt))
        full = list(getattr(full, "input_ids", full))
        assert full[:len(prompt)] == prompt
        rows.append({"id": f"demo:{i}", "input_ids": full,
                     "loss_mask": [0] * len(prompt) + [1] * (len(full) - len(prompt)),
                     "prompt_len": len(prompt), "teacher_input_ids": None,
                     "teacher_loss_mask": None, "teacher_prompt_len": None,
                     "response": answer, "label": label, "num_tokens": len(full)})
    return rows


def make_cfg(work_dir, prepared, student, teacher=None, **eval_kw) -> Config:
    cfg = Config(name="evaltest")
    cfg.storage.work_dir = str(work_dir)
    cfg.storage.prepared_path = str(prepared)
    cfg.storage.teacher_cache_path = os.path.join(str(work_dir), "no_cache")
    cfg.train.save_path = student
    cfg.model.student_name_or_path = student
    cfg.model.teacher_name_or_path = teacher
    cfg.model.attn_implementation = "sdpa"
    cfg.train.device = "cpu"
    cfg.tracking.tracking_uri = "none"
    cfg.eval.eval_num_generations = eval_kw.pop("n_gen", 3)
    cfg.eval.eval_max_new_tokens = eval_kw.pop("max_new", 6)
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    return cfg


def prepare_qa(out_dir: str, tokenizer_dir: str, qa=QA, teacher_dir: str | None = None) -> str:
    """``qa`` as a JSONL file, through the REAL prepare stage (chat template, loss masks,
    manifest.json with its data_hash) into ``out_dir``: train and eval are both ``qa``."""
    from kubedistill.data.prepare import prepare

    src = os.path.join(out_dir + "-raw", "qa.jsonl")
    os.makedirs(os.path.dirname(src), exist_ok=True)
    with open(src, "w") as f:
        for question, answer, label in qa:
            f.write(json.dumps({"question": question, "answer": answer, "label": label}) + "\n")
    cfg = Config().update(dict(student_name_or_path=tokenizer_dir,
                               teacher_name_or_path=teacher_dir or tokenizer_dir,
                               train_dataset_path=src, eval_dataset_path=src,
                               input_key="question", output_key="answer", label_key="label",
                               max_len=256, prepared_path=out_dir,
                               work_dir=out_dir + "-work", preprocess_num_workers=1))
    prepare(cfg)
    return out_dir


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    from kubedistill.data.prepared import load_split

    out = prepare_qa(str(tmp_path_factory.mktemp("prepared") / "prepared"), tiny_model_dir)
    rows = load_split(out, "eval").to_pylist()
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in
                                             eval_rows(load_tokenizer(tiny_model_dir))]
    return out, rows


def direct_ce(model_dir: str, rows: list[dict]) -> float:
    """Reference: full logits, shift by one, mean CE over loss-mask tokens."""
    model = load_causal_lm(model_dir)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(ids).logits[0, :-1].double()
            mask = torch.tensor(r["loss_mask"][1:], dtype=torch.bool)
            ce = F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
            total += float(ce)
            n += int(mask.sum())
    return total / n


def test_evaluate_self_teacher(tmp_path, prepared, tiny_model_dir, monkeypatch):
    prep, rows = prepared
    cfg = make_cfg(tmp_path / "w", prep, tiny_model_dir, teacher=tiny_model_dir)
    from kubedistill.evaluate import stage

    m = stage.evaluate(cfg)
    assert m["eval_ce"] == pytest.approx(direct_ce(tiny_model_dir, rows), rel=1e-4)
    assert m["eval_ppl"] == pytest.approx(math.exp(m["eval_ce"]))
    assert m["eval_kl"] == pytest.approx(0.0, abs=1e-5)  # the teacher IS the student
    assert m["eval_top1_agreement"] == 1.0
    assert m["teacher_eval_ce"] == pytest.approx(m["eval_ce"], rel=1e-5)
    assert m["eval_task"] == "gsm8k"
    # measured: the random 2-layer model answers none of the 3 generated questions in 6
    # tokens; the metric is the mean of the per-row verdicts, the teacher's (same model) too
    assert m["eval_accuracy"] == 0.0 == m["teacher_eval_accuracy"]
    assert m["score"] == m["eval_ce"] and m["score_metric"] == "eval_ce"
    assert m["higher_is_better"] is False and m["teacher_signal"] == "live"
    assert m["data_hash"] == json.loads((Path(prep) / "manifest.json").read_text())["data_hash"]
    assert len(m["eval_data_hash"]) == 16
    out = tmp_path / "w" / "eval"
    assert json.loads((out / "metrics.json").read_text()) == m
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3
    assert gens[0]["student_output"] == gens[0]["teacher_output"]  # same model, greedy
    assert set(gens[0]) >= {"prompt", "reference", "student_output", "teacher_output",
                            "correct"}
    baselines = list(out.glob("teacher_baseline-*.json"))
    assert len(baselines) == 1

    # second run: the baseline is reused (no teacher scoring again)
    def boom(*a, **k):
        raise AssertionError("teacher baseline recomputed")

    monkeypatch.setattr(stage, "teacher_baseline", boom)
    m2 = stage.evaluate(cfg)
    assert m2["teacher_eval_ce"] == m["teacher_eval_ce"] and m2["eval_ce"] == m["eval_ce"]


def test_cache_signal_matches_live_teacher(prepared, tiny_model_dir, tiny_teacher_dir,
                                           tmp_path):
    """KL from the REAL teacher cache stage's hidden states (fp32) == KL from the live
    teacher on the same rows."""
    from kubedistill.evaluate import scoring
    from kubedistill.evaluate.teacher_signal import CacheSignal, LiveSignal
    from kubedistill.teacher.cache import cache_teacher
    from kubedistill.teacher.head import TeacherHead
    from kubedistill.teacher.reader import TeacherCache

    prep, rows = prepared
    student, teacher = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_teacher_dir)
    cache_uri = str(tmp_path / "teacher_cache")
    cfg = Config().update(dict(teacher_name_or_path=tiny_teacher_dir, prepared_path=prep,
                               teacher_cache_path=cache_uri, teacher_backend="hf",
                               cache_dtype="fp32", work_dir=str(tmp_path / "wd")))
    cache_teacher(cfg)
    cache = TeacherCache(cache_uri)
    assert all(r["id"] in cache for r in rows)

    results = []
    for signal in (LiveSignal(teacher, "cpu"), CacheSignal(cache)):
        stats = scoring.TokenStats()
        head = TeacherHead.from_model(student)
        with torch.no_grad():
            for batch in scoring.make_batches([r["input_ids"] for r in rows],
                                              [r["loss_mask"] for r in rows], 256):
                hidden, targets, brow = scoring.target_hidden(student, batch, "cpu")
                t, keep = signal.logits(batch, rows, brow)
                stats.add(head, hidden, targets, brow, t, keep)
        results.append(stats.means())
    live, cached = results
    assert cached["eval_kl"] == pytest.approx(live["eval_kl"], rel=1e-4)
    assert cached["eval_top1_agreement"] == live["eval_top1_agreement"]
    assert live["eval_kl"] > 0.0


def test_adapters_only_dir_is_merged(tmp_path, tiny_model_dir):
    """A save_path holding LoRA adapters only is merged into its base before use."""
    from peft import LoraConfig, get_peft_model

    from kubedistill.evaluate.model_dir import is_adapter_dir, load_model

    base = load_causal_lm(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                              "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # make the adapters matter
    out = str(tmp_path / "adapters")
    peft.save_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        expected = peft(ids).logits
        plain = load_causal_lm(tiny_model_dir)(ids).logits
    assert is_adapter_dir(out)
    model, tok, _ = load_model(out, base_ref=tiny_model_dir)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)
    assert tok.pad_token_id == tok.eos_token_id == 2  # SmolLM2's <|im_end|>: the base's tokenizer
