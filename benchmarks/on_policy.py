"""On-policy benchmark: does on-policy KD bring the student closer to the teacher on the
student's OWN samples of held-out prompts?

    .venv/bin/python benchmarks/on_policy.py [--iterations 8] [--prompts 64] \
        [--eval-prompts 8] [--new-tokens 32] [--samples 2] [--lr 3e-4]

Teacher: the real SmolLM2-135M-Instruct (packaged). Student: 6 layers derived from the
teacher's (0,6,12,18,24,29), as in ``recipes/on_policy.yaml``. Data: the recipe's
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
def measure(student_dir: str, teacher, prompts: list[list[int]], *, samples: int,
            new_tokens: int, seed: int = 1234) -> dict[str, float]:
    engine = HFRolloutEngine.from_pretrained(student_dir)
    engine.stop_ids = engine.stop_ids | {int(teacher.config.eos_token_id)}
    rolled = engine.generate(prompts, n_samples_per_prompt=samples, max_new_tokens=new_tokens,
                             temperature=1.0, top_p=1.0, seed=seed)
    student = engine.model
    kl = rkl = agree = tlp = n = 0.0
    for s in rolled:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        p, r = len(s.prompt_ids), len(s.response_ids)
        pos = torch.arange(p - 1, p - 1 + r)
        ls = torch.log_softmax(student(ids).logits[0, pos].float(), -1)
        lt = torch.log_softmax(teacher(ids).logits[0, pos].float(), -1)
        kl += float((lt.exp() * (lt - ls)).sum())
        rkl += float((ls.exp() * (ls - lt)).sum())
        agree += float((lt.argmax(-1) == ls.argmax(-1)).sum())
        tlp += float(lt.gather(1, torch.tensor(s.response_ids)[:, None]).sum())
        n += r
    return {"kl_teacher_student": kl / n, "kl_student_teacher": rkl / n,
            "top1_agreement": agree / n, "teacher_logprob": tlp / n,
            "response_len": n / len(rolled),
            "truncation_rate": sum(s.truncated for s in rolled) / len(rolled),
            "samples": len(rolled)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="kubedistill-onpolicy-bench-")
    cfg = load_config(RECIPE, {
        "work_dir": work, "save_path": os.path.join(work, "model"),
        "ckpt_path": os.path.join(work, "ckpt"), "max_samples": args.prompts,
        "eval_max_samples": args.eval_prompts, "generate_max_len": args.new_tokens,
        "rollout_batch_size": 8, "n_samples_per_prompt": 1, "train_batch_size": 8,
        "micro_train_batch_size": 4, "learning_rate": args.lr, "min_lr": args.lr / 10,
        "max_steps": args.iterations, "save_steps": -1, "rollout_backend": "hf",
        "teacher_backend": "hf", "device": "cpu", "tracking_uri": "off",
        "print_rollout_sample": 2})
    from kubedistill.data.prepare import prepare

    t0 = time.perf_counter()
    prepare(cfg)
    teacher_dir = resolve_model_path(cfg.model.teacher_name_or_path)
    student_dir = os.path.join(work, "student_init")
    if not os.path.exists(os.path.join(student_dir, "config.json")):
        derive_student(teacher_dir, cfg.model.student_from_teacher_layers, student_dir)
    eval_table = load_split(cfg.prepared_path, "eval", columns=["input_ids", "prompt_len"])
    prompts = [ids[:plen] for ids, plen in zip(eval_table.column("input_ids").to_pylist(),
                                               eval_table.column("prompt_len").to_pylist(),
                                               strict=True)][:args.eval_prompts]
    teacher = load_causal_lm(teacher_dir, attn_implementation="sdpa")
    kw = dict(samples=args.samples, new_tokens=args.new_tokens)
    before = measure(student_dir, teacher, prompts, **kw)
    t1 = time.perf_counter()
    train(cfg)
    t2 = time.perf_counter()
    after = measure(cfg.train.save_path, teacher, prompts, **kw)
    with open(os.path.join(work, "train", "train_log.jsonl")) as f:
        iters = [r for r in map(json.loads, f) if "iteration" in r]
    print(f"\non-policy: {args.iterations} iterations x 8 prompts x {args.new_tokens} new "
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
