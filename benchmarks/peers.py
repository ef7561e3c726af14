"""kubedistill against Hugging Face TRL (off-policy GKD), side by side in one run.

    pip install -e '.[bench]'          # trl==1.16.0, benchmark only
    OMP_NUM_THREADS=2 python benchmarks/peers.py [--work_dir DIR] [--max_samples 32]
        [--pairs 2]

Both systems get the same teacher (SmolLM2-135M-Instruct, packaged), the same student
initialisation (the 6-layer student derived from teacher layers 0,6,12,18,24,29, saved
once), the same prepared tokens and loss masks (``kubedistill prepare`` of the quickstart
data), batch (8 samples = 2 micro-batches of 4), number of optimizer steps, learning rate and
schedule (cosine to min_lr, warm-up ratio), AdamW betas (0.9, 0.98), weight decay 0, grad
clip 1.0, fp32, ``OMP_NUM_THREADS`` and the loss: forward KL(teacher || student) on the
loss tokens only (kubedistill ``kd_ratio 1 kd_loss_fn kl``; TRL ``GKDTrainer`` with
``lmbda 0`` (off-policy), ``beta 0`` (forward KL), temperature 1). The sample order differs
(each system shuffles with its own sampler).

The runs alternate, kubedistill then TRL, ``--pairs`` times; each figure is the median over
pairs and the ratio is taken pair by pair. Per run: real (non-pad) tokens/s of the training
loop, tokens/s of the whole process (model loading included), and the peak RSS of the
process tree (``wait4``). kubedistill is measured twice: with the teacher cache built
(cache-teacher time added) and with the cache reused (train only). Both final students are
scored by the same ``kubedistill evaluate`` (held-out full-vocabulary KL(teacher || student)
and CE). ``DistillationTrainer`` (TRL's on-policy trainer) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
TEACHER = "packaged:smollm2-135m-instruct"
LAYERS = "0,6,12,18,24,29"


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the process tree) of one command."""
    started = time.monotonic()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return time.monotonic() - started, usage.ru_maxrss / 1024


def kd(name: str, overrides: dict) -> list[str]:
    argv = [sys.executable, "-m", "kubedistill.cli", name, "-c", RECIPE]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return argv


# ---- the TRL side (run in its own process) -------------------------------------------------
def trl_worker(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kubedistill.models import resolve_model_path

    table = pq.read_table(os.path.join(args.prepared, "train.parquet"),
                          columns=["input_ids", "loss_mask"]).to_pylist()
    tok = AutoTokenizer.from_pretrained(args.student)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seen = {"tokens": 0}

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            keep = torch.tensor(r["loss_mask"]) == 1  # label at i = token i (shifted in TRL)
            labels[i, :n] = torch.where(keep, ids[i, :n], torch.tensor(-100))
        seen["tokens"] += int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    teacher = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(args.teacher, None), dtype=torch.float32, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32,
                                                   attn_implementation="sdpa")
    config = GKDConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=args.lr, lr_scheduler_type=
        "cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": args.min_lr},
        warmup_steps=args.warmup, adam_beta1=0.9, adam_beta2=0.98, weight_decay=0.0,
        max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, lmbda=0.0, beta=0.0,
        temperature=1.0, seq_kd=False, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=42, max_length=None, disable_dropout=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=Dataset.from_list(table), processing_class=tok,
                         data_collator=collate)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    trainer.save_model(os.path.join(args.out, "model"))
    tok.save_pretrained(os.path.join(args.out, "model"))
    with open(os.path.join(args.out, "trl_summary.json"), "w") as f:
        json.dump({"tokens": seen["tokens"], "train_time_s": seconds,
                   "steps": trainer.state.global_step}, f)


# ---- the driver ----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/kubedistill-bench/peers")
    parser.add_argument("--max_samples", type=int, default=32)
    parser.add_argument("--eval_max_samples", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default=TEACHER, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--min_lr", type=float, default=1e-5, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=0.1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    work = args.work_dir
    student = f"{work}/student-init"
    shared = {"work_dir": work, "max_samples": args.max_samples,
              "eval_max_samples": args.eval_max_samples, "max_len": 256,
              "prompt_max_len": 192, "tracking_uri": "none", "eval_task": "none",
              "prepared_path": f"{work}/prepared", "teacher_cache_path": f"{work}/cache",
              "train_batch_size": 8, "micro_train_batch_size": 4, "save_steps": -1,
              "kd_ratio": 1.0, "kd_loss_fn": "kl", "learning_rate": args.lr,
              "min_lr": 1e-5, "lr_warmup_ratio": 0.1, "student_name_or_path": student,
              "student_from_teacher_layers": "none", "logging_steps": 1}
    if not os.path.exists(f"{student}/config.json"):  # prepare reads its tokenizer
        subprocess.run([sys.executable, "-m", "kubedistill.cli", "models", "derive", TEACHER,
                        student, "--layers", LAYERS], check=True)
    subprocess.run(kd("prepare", shared), check=True)
    cache_s, cache_rss = timed(kd("cache-teacher", shared))
    runs: dict[str, list[dict]] = {"kubedistill": [], "trl": []}
    for pair in range(args.pairs):
        arm = f"{work}/kd-{pair}"
        cfg = {**shared, "save_path": f"{arm}/model", "ckpt_path": f"{arm}/ckpt",
               "work_dir": arm}
        wall, rss = timed(kd("train", cfg))
        with open(f"{arm}/model/train_summary.json") as f:
            s = json.load(f)
        runs["kubedistill"].append({"wall": wall, "rss": rss, "tokens": s["tokens"],
                                    "loop": s["train_time_s"], "steps": s["steps"], "cfg": cfg})
        out = f"{work}/trl-{pair}"
        wall, rss = timed([sys.executable, __file__, "--trl_worker", "--prepared",
                           shared["prepared_path"], "--student", student, "--out", out,
                           "--steps", str(s["steps"]), "--lr", str(args.lr)])
        with open(f"{out}/trl_summary.json") as f:
            t = json.load(f)
        runs["trl"].append({"wall": wall, "rss": rss, "tokens": t["tokens"],
                            "loop": t["train_time_s"], "steps": t["steps"],
                            "cfg": {**cfg, "save_path": f"{out}/model", "work_dir": out}})
    metrics = {}
    for system in runs:
        cfg = runs[system][0]["cfg"]
        subprocess.run(kd("evaluate", cfg), check=True)
        with open(f"{cfg['work_dir']}/eval/metrics.json") as f:
            metrics[system] = json.load(f)
    report(runs, metrics, cache_s, cache_rss, args)


def report(runs, metrics, cache_s, cache_rss, args) -> None:
    med = statistics.median

    def rates(r, with_cache=False):
        extra = cache_s if with_cache else 0.0
        return r["tokens"] / (r["loop"] + extra), r["tokens"] / (r["wall"] + extra)

    kd_runs, trl_runs = runs["kubedistill"], runs["trl"]
    rows = [("kubedistill, cache reused", [rates(r) for r in kd_runs],
             [r["rss"] for r in kd_runs], metrics["kubedistill"]),
            ("kubedistill, cache built", [rates(r, True) for r in kd_runs],
             [max(r["rss"], cache_rss) for r in kd_runs], metrics["kubedistill"]),
            ("TRL GKDTrainer (lmbda 0, beta 0)", [rates(r) for r in trl_runs],
             [r["rss"] for r in trl_runs], metrics["trl"])]
    trl_rates = [rates(r) for r in trl_runs]
    print(f"\nkubedistill vs TRL {_trl_version()}, off-policy forward KL, SmolLM2-135M -> "
          f"6-layer student, fp32, {kd_runs[0]['steps']} steps x 8 samples, "
          f"max_samples={args.max_samples}, {args.pairs} pairs (median), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; cache-teacher "
          f"{cache_s:.1f} s")
    print("| system | loop tok/s | process tok/s | loop ratio vs TRL | process ratio vs TRL "
          "| peak RSS MiB | held-out KL(T||S) | held-out CE |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs, rss, m in rows:
        loop_ratio = med([a[0] / b[0] for a, b in zip(rs, trl_rates, strict=True)])
        proc_ratio = med([a[1] / b[1] for a, b in zip(rs, trl_rates, strict=True)])
        print(f"| {name} | {med([r[0] for r in rs]):.0f} | {med([r[1] for r in rs]):.0f} | "
              f"{loop_ratio:.2f}x | {proc_ratio:.2f}x | {med(rss):.0f} | "
              f"{m['eval_kl']:.4f} | {m['eval_ce']:.4f} |")


def _trl_version() -> str:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
