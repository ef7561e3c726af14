"""On-policy benchmark: does on-policy KD bring the student closer to the teacher on the
student's OWN samples of held-out prompts?

    .venv/bin/python benchmarks/on_policy.py [--recipe recipes/on_policy.yaml] \
        [--iterations 8] [--prompts 64] [--eval-prompts 8] [--new-tokens 32] [--samples 2] \
        [--lr 3e-4] [--student-layers 0,6,12,18,24,29]

Teacher: the recipe's -- the real SmolLM2-135M-Instruct for ``recipes/on_policy.yaml``, the
real Qwen2.5-Coder-0.5B-Instruct (another tokenizer) for
``recipes/cross_tokenizer_on_policy.yaml``. Student: 6 layers (0,6,12,18,24,29) of the
recipe's student, or of its teacher when the recipe derives the student from it. With a
teacher of another tokenizer, KL and top-1 are measured at the aligned positions over the
shared sub-vocabulary, exactly as training compares them, and the teacher's log-prob of the
sampled tokens is not defined (nan). Data: the recipe's
``packaged:gsm8k-train`` prompts (prepared by the prepare stage) for training, the
``packaged:gsm8k-eval`` prompts for measuring. Training is the real train stage
(``train(cfg)`` -> torchrun, 1 process, CPU, hf engines) with ``--iterations`` iterations of
``rollout_batch_size = 8`` prompts x 1 sample x ``--new-tokens`` tokens, reverse KL, kd_ratio 1.

Measured before (the starting student) and after (the trained student), each on FRESH
samples of that student (``--samples`` per held-out prompt, temperature 1, same seed):
per response token, mean KL(teacher || student), mean KL(student || teacher) (the trained
objective), teacher/student top-1 agreement, and the teacher's mean log-prob of the
sampled tokens; plus response length and truncation rate. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from kubedistill.config import load_config
from kubedistill.data.prepared import load_split
from kubedistill.models import load_causal_lm
from kubedistill.models.derive import derive_student
from kubedistill.models.loading import resolve_model_path
from kubedistill.rollout.hf import HFRolloutEngine
from kubedistill.train.launch import train

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "recipes", "on_policy.yaml")


@torch.no_grad()
def measure(student_dir: str, teacher, prompts: list[list[int]],
            teacher_prompts: list[list[int]], *, samples: int, new_tokens: int,
            bridge=None, seed: int = 1234) -> dict[str, float]:
    """Per compared response token of fresh student samples: KL both ways, top-1 agreement,
    the teacher's log-prob of the sampled token (same tokenizer only). The teacher sees its
    own prompt + the response, built and aligned exactly as in training
    (:func:`~kubedistill.train.on_policy_data.teacher_requests`); with a ``bridge`` (another
    tokenizer) the comparison is at the aligned positions over the shared sub-vocabulary."""
    from kubedistill.train.on_policy_data import teacher_requests

    engine = HFRolloutEngine.from_pretrained(student_dir)
    if bridge is None:
        engine.stop_ids = engine.stop_ids | {int(teacher.config.eos_token_id)}
    rolled = engine.generate(prompts, n_samples_per_prompt=samples, max_new_tokens=new_tokens,
                             temperature=1.0, top_p=1.0, seed=seed)
    requests = teacher_requests(rolled, [teacher_prompts[s.prompt_index] for s in rolled],
                                bridge)
    s_cols = t_cols = None
    if bridge is not None:
        vmap = bridge.vocab_map
        s_cols, t_cols = vmap.student_ids, vmap.teacher_ids
    student = engine.model
    kl = rkl = agree = tlp = n = 0.0
    for s, req in zip(rolled, requests, strict=True):
        pairs = torch.as_tensor(req.pairs) if req.pairs is not None else \
            torch.tensor([req.keys, req.positions]).T
        if not len(pairs):
            continue
        ls = student(torch.tensor([s.prompt_ids + s.response_ids])).logits[0, pairs[:, 0]]
        lt = teacher(torch.tensor([req.tokens])).logits[0, pairs[:, 1]]
        if s_cols is not None:
            ls, lt = ls[:, s_cols], lt[:, t_cols]
        ls, lt = torch.log_softmax(ls.float(), -1), torch.log_softmax(lt.float(), -1)
        kl += float((lt.exp() * (lt - ls)).sum())
        rkl += float((ls.exp() * (ls - lt)).sum())
        agree += float((lt.argmax(-1) == ls.argmax(-1)).sum())
        if bridge is None:
            tlp += float(lt.gather(1, torch.tensor(s.response_ids)[:, None]).sum())
        n += len(pairs)
    return {"kl_teacher_student": kl / n, "kl_student_teacher": rkl / n,
            "top1_agreement": agree / n,
            "teacher_logprob": tlp / n if bridge is None else float("nan"),
            "response_len": sum(len(s.response_ids) for s in rolled) / len(rolled),
            "truncation_rate": sum(s.truncated for s in rolled) / len(rolled),
            "samples": len(rolled), "compared": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=RECIPE,
                    help="on_policy.yaml (same tokenizer) or cross_tokenizer_on_policy.yaml")
    ap.add_argument("--student-layers", default="0,6,12,18,24,29",
                    help="layers of the recipe's student (else of its teacher) kept in the "
                         "starting student")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="kubedistill-onpolicy-bench-")
    student_dir = os.path.join(work, "student_init")
    cfg = load_config(args.recipe, {
        "work_dir": work, "save_path": os.path.join(work, "model"),
        "ckpt_path": os.path.join(work, "ckpt"), "max_samples": args.prompts,
        "eval_max_samples": args.eval_prompts, "generate_max_len": args.new_tokens,
        "rollout_batch_size": 8, "n_samples_per_prompt": 1, "train_batch_size": 8,
        "micro_train_batch_size": 4, "learning_rate": args.lr, "min_lr": args.lr / 10,
        "max_steps": args.iterations, "save_steps": -1, "rollout_backend": "hf",
        "teacher_backend": "hf", "device": "cpu", "tracking_uri": "off",
        "print_rollout_sample": True})
    from kubedistill.data.prepare import prepare
    from kubedistill.train.on_policy import cross_tokenizer_map

    t0 = time.perf_counter()
    base = cfg.model.student_name_or_path or cfg.model.teacher_name_or_path
    if not os.path.exists(os.path.join(student_dir, "config.json")):
        derive_student(resolve_model_path(base), args.student_layers, student_dir)
    cfg.set("student_name_or_path", student_dir)
    cfg.set("student_from_teacher_layers", None)
    prepare(cfg)
    teacher_dir = resolve_model_path(cfg.model.teacher_name_or_path)
    cols = ["input_ids", "prompt_len", "teacher_input_ids", "teacher_prompt_len"]
    rows = load_split(cfg.prepared_path, "eval", columns=cols).to_pylist()[:args.eval_prompts]
    prompts = [r["input_ids"][:r["prompt_len"]] for r in rows]
    teacher_prompts = [r["teacher_input_ids"][:r["teacher_prompt_len"]]
                       if r["teacher_input_ids"] else p for r, p in zip(rows, prompts,
                                                                        strict=True)]
    vmap = cross_tokenizer_map(cfg)
    bridge = None
    if vmap is not None:
        from kubedistill.crosstok.bridge import TokenizerBridge
        from kubedistill.models import load_tokenizer

        bridge = TokenizerBridge(load_tokenizer(student_dir), load_tokenizer(teacher_dir), vmap)
    teacher = load_causal_lm(teacher_dir, attn_implementation="sdpa")
    kw = dict(samples=args.samples, new_tokens=args.new_tokens, bridge=bridge)
    before = measure(student_dir, teacher, prompts, teacher_prompts, **kw)
    t1 = time.perf_counter()
    train(cfg)
    t2 = time.perf_counter()
    after = measure(cfg.train.save_path, teacher, prompts, teacher_prompts, **kw)
    with open(os.path.join(work, "train", "train_log.jsonl")) as f:
        iters = [r for r in map(json.loads, f) if "iteration" in r]
    print(f"\n{os.path.basename(args.recipe)}: teacher {cfg.model.teacher_name_or_path}, "
          f"student {base} layers {args.student_layers}; KL over "
          f"{'aligned positions, shared sub-vocabulary' if bridge else 'every response token'}")
    print(f"on-policy: {args.iterations} iterations x 8 prompts x {args.new_tokens} new "
          f"tokens, lr {args.lr}; held-out: {len(prompts)} prompts x {args.samples} samples; "
          f"prepare+before {t1 - t0:.0f} s, train stage {t2 - t1:.0f} s\n")
    print("| student | KL(T‖S)/token | KL(S‖T)/token | top-1 agree | teacher log-p | "
          "resp len | truncated |")
    print("|---|---|---|---|---|---|---|")
    for name, m in (("start (6-layer derived)", before), ("after on-policy", after)):
        print(f"| {name} | {m['kl_teacher_student']:.3f} | {m['kl_student_teacher']:.3f} | "
              f"{m['top1_agreement']:.3f} | {m['teacher_logprob']:.3f} | "
              f"{m['response_len']:.1f} | {m['truncation_rate']:.2f} |")
    print("\nper iteration (training samples, before each update):")
    print("| iter | KL(T‖S) | top-1 | resp len | truncated | rollout s | teacher s | "
          "train s | sync s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in iters:
        print(f"| {r['iteration']} | {r['onpolicy/kl']:.3f} | {r['onpolicy/top1_agree']:.3f} | "
              f"{r['rollout/response_len']:.1f} | {r['rollout/truncation_rate']:.2f} | "
              f"{r['time/rollout_s']:.1f} | {r['time/teacher_s']:.1f} | "
              f"{r['time/train_s']:.1f} | {r['time/sync_s']:.1f} |")


if __name__ == "__main__":
    main()
