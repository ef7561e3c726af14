"""Top-k teacher caches against the hidden-state cache, with the real SmolLM2 teacher.

    python benchmarks/topk.py [--work_dir DIR] [--max_samples 48] [--ks 8,32,128]

Prepares the quickstart data once, then per arm (hidden-state cache, top-k caches for each
k with ``teacher_signal: topk``) runs ``cache-teacher``, ``train`` and ``evaluate`` through
the CLI: the same derived 6-layer student initialisation, the same batches, the same number
of optimizer steps, ``kd_loss_fn kl`` (top-k arms: the tail-bucket top-k KL). Reports cache
bytes per loss position (measured: shard bytes / positions), cache-teacher wall seconds,
train tokens/s (``train_summary.json``), and the evaluate stage's held-out full-vocabulary
KL(teacher || student) and CE (the same metric for every arm: a live fp32 teacher scores
all of them). Then projects the bytes per position to bf16 teachers
with d = 4096 and d = 8192: hidden 2·d, top-k 8·k (int32 id + float32 log-prob).
"""

from __future__ import annotations

import argparse
import json

from _stages import run_stage as stage  # benchmarks/ is the script folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/kubedistill-bench/topk")
    parser.add_argument("--max_samples", type=int, default=48)
    parser.add_argument("--eval_max_samples", type=int, default=16)
    parser.add_argument("--ks", default="8,32,128")
    args = parser.parse_args()
    work = args.work_dir
    shared = {"work_dir": work, "max_samples": args.max_samples,
              "eval_max_samples": args.eval_max_samples, "max_len": 256,
              "prompt_max_len": 192, "tracking_uri": "none", "eval_task": "none",
              "prepared_path": f"{work}/prepared", "train_batch_size": 8,
              "micro_train_batch_size": 4, "save_steps": -1, "kd_ratio": 0.5,
              "kd_loss_fn": "kl", "logging_steps": 1}
    stage("prepare", shared)
    arms = [("hidden bf16", {"teacher_signal": "hidden"})]
    arms += [(f"top-{k}", {"teacher_signal": "topk", "cache_topk": k})
             for k in map(int, args.ks.split(","))]
    rows = []
    for name, extra in arms:
        arm_dir = f"{work}/{name.replace(' ', '-')}"
        cfg = {**shared, **extra, "teacher_cache_path": f"{arm_dir}/cache",
               "work_dir": arm_dir, "save_path": f"{arm_dir}/model",
               "ckpt_path": f"{arm_dir}/checkpoints"}
        cache_s = stage("cache-teacher", cfg)
        stage("train", cfg)
        # every arm is scored by a live fp32 teacher (not a cache), so the KL is one metric
        stage("evaluate", {**cfg, "teacher_cache_path": f"{arm_dir}/no-cache"})
        with open(f"{arm_dir}/cache/manifest.json") as f:
            totals = json.load(f)["totals"]
        with open(f"{arm_dir}/model/train_summary.json") as f:
            summary = json.load(f)
        with open(f"{arm_dir}/eval/metrics.json") as f:
            metrics = json.load(f)
        rows.append({"arm": name, "k": extra.get("cache_topk", 0),
                     "bytes_per_pos": totals["bytes"] / totals["positions"],
                     "cache_s": cache_s, "steps": summary["steps"],
                     "tok_s": summary["tokens"] / summary["train_time_s"],
                     "kl": metrics["eval_kl"], "ce": metrics["eval_ce"]})
    print(f"\nTop-k vs hidden-state cache, SmolLM2-135M teacher (d=576), quickstart data, "
          f"max_samples={args.max_samples}, eval {args.eval_max_samples}, kd_loss_fn kl")
    print("| arm | cache B/position | cache-teacher s | steps | train tok/s | "
          "held-out KL(T||S) | held-out CE |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['bytes_per_pos']:.0f} | {r['cache_s']:.1f} | {r['steps']} | "
              f"{r['tok_s']:.0f} | {r['kl']:.4f} | {r['ce']:.4f} |")
    print("\nProjected teacher-signal bytes per loss position (payload, bf16 hidden 2·d, "
          "top-k 8·k):")
    print("| teacher | hidden | " + " | ".join(f"top-{r['k']}" for r in rows[1:]) + " |")
    print("|---|---|" + "---|" * (len(rows) - 1))
    for d in (576, 4096, 8192):
        hidden = 2 * d
        tops = " | ".join(f"{8 * r['k']} ({hidden / (8 * r['k']):.1f}x smaller)"
                          for r in rows[1:])
        print(f"| d={d} | {hidden} | {tops} |")


if __name__ == "__main__":
    main()
