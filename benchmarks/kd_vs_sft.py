"""KD vs SFT at equal steps on the quickstart data, with the real SmolLM2 teacher.

    python benchmarks/kd_vs_sft.py [--work_dir DIR] [--max_samples 192] [--kd_loss_fn kl]

Prepares the quickstart data and caches the teacher once, then trains the same derived
6-layer student twice from the same initialisation, on the same batches, for the same number
of optimizer steps: once with ``vanilla_kd`` (kd_ratio 0.5) and once with ``sft`` (CE only).
Both are evaluated on the held-out split: CE on the reference answers and KL(teacher ||
student) per token (teacher from the cache). Prints one table; lower is better for both.
Stages run through the same CLI entry points as ``make run`` (``kubedistill STAGE``).
"""

from __future__ import annotations

import argparse
import json

from _stages import run_stage as stage  # benchmarks/ is the script folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/kubedistill-bench/kd_vs_sft")
    parser.add_argument("--max_samples", type=int, default=192)
    parser.add_argument("--kd_loss_fn", default="kl")
    parser.add_argument("--kd_ratio", type=float, default=0.5)
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="default: the quickstart recipe's")
    args = parser.parse_args()
    shared = {"work_dir": args.work_dir, "max_samples": args.max_samples,
              "tracking_uri": "none", "eval_task": "none",
              "prepared_path": f"{args.work_dir}/prepared",
              "teacher_cache_path": f"{args.work_dir}/teacher_cache"}
    if args.learning_rate is not None:
        shared["learning_rate"] = args.learning_rate
    stage("prepare", shared)
    stage("cache-teacher", shared)
    rows = []
    for arm, extra in (("kd", {"kd_algorithm": "vanilla_kd", "kd_ratio": args.kd_ratio,
                               "kd_loss_fn": args.kd_loss_fn}),
                       ("sft", {"kd_algorithm": "sft"})):
        arm_dir = f"{args.work_dir}/{arm}-lr{shared.get('learning_rate', 'recipe')}"
        cfg = {**shared, **extra, "work_dir": arm_dir, "save_path": f"{arm_dir}/model",
               "ckpt_path": f"{arm_dir}/checkpoints", "save_steps": -1}
        seconds = stage("train", cfg)
        stage("evaluate", cfg)
        with open(f"{arm_dir}/eval/metrics.json") as f:
            metrics = json.load(f)
        with open(f"{arm_dir}/model/train_summary.json") as f:
            steps = json.load(f)["steps"]
        rows.append((arm, steps, metrics["eval_ce"], metrics["eval_kl"],
                     metrics["eval_top1_agreement"], seconds))
    print(f"\nKD vs SFT, quickstart data, max_samples={args.max_samples}, "
          f"learning_rate={shared.get('learning_rate', 'recipe')}, kd_ratio={args.kd_ratio}, "
          f"kd_loss_fn={args.kd_loss_fn}")
    print("| arm | steps | held-out CE | held-out KL(T||S) | top-1 agreement | train s |")
    print("|---|---|---|---|---|---|")
    for arm, steps, ce, kl, top1, seconds in rows:
        print(f"| {arm} | {steps} | {ce:.4f} | {kl:.4f} | {top1:.3f} | {seconds:.0f} |")
    kd, sft = rows
    print(f"\nKD / SFT: CE {kd[2] / sft[2]:.3f}x, KL {kd[3] / sft[3]:.3f}x")


if __name__ == "__main__":
    main()
