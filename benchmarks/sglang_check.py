"""The SGLang checks, for a machine where SGLang runs (a GPU node of the cluster): one table.

    python benchmarks/sglang_check.py --model DIR [--tp 1] [--mem-fraction 0.25]

``DIR`` is an HF model directory (the teacher; also used as the student of the rollout
engine). Rows:

1. **engine lifecycle** (teacher + rollout engine in ONE process, ``enable_sleep``): waking
   engines that never slept is a no-op; the teacher's states after sleep + wake equal those
   before (``enable_weights_cpu_backup``); a weight push into the sleeping teacher goes
   through ``awake()``; the rollout engine samples after sleep, wake and a bucketed push
   (``flush_cache`` on the last bucket only); ``close_all`` closes both and this process
   survives (SIGQUIT from the killed schedulers' watchdogs is ignored while closing);
2. **teacher states vs HF in bf16**: SGLang's final hidden states against transformers'
   ``model.model(...).last_hidden_state`` (bf16, same GPU) on sequences of ``--seq`` tokens,
   one of them longer than the prefill budget: max abs difference, cosine, and the largest
   log-prob difference through the teacher head; the start-up probe's own error is logged;
3. **max_new_tokens 0 vs 1**: the number of hidden-state blocks and rows each returns, and
   whether the prefill blocks are equal.

Without sglang (or CUDA) the script says so and exits with status 2; ``--help`` always works.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

ROWS: list[tuple[str, str]] = []


def row(check: str, result: str) -> None:
    ROWS.append((check, result))
    print(f"  {check}: {result}", file=sys.stderr, flush=True)


def make_config(args):
    from kubedistill.config import Config

    cfg = Config()
    cfg.update(dict(teacher_name_or_path=args.model, student_name_or_path=args.model,
                    teacher_tp_size=args.tp, rollout_tp_size=args.tp, enable_sleep=True,
                    teacher_mem_fraction_static=args.mem_fraction,
                    rollout_mem_fraction_static=args.mem_fraction,
                    teacher_batch_tokens=args.budget, sglang_dtype="bfloat16",
                    teacher_backend="sglang", rollout_backend="sglang", device="cuda"))
    return cfg


def check_lifecycle(cfg, args, teacher, rollout) -> None:
    import torch
    from safetensors.torch import load_file

    from kubedistill.rollout.sync import push
    from kubedistill.train.fsdp import DistEnv

    seqs, pos = [list(range(100, 100 + args.seq // 4))], [list(range(args.seq // 4))]
    teacher.wake()
    rollout.wake()  # neither slept: no-ops, no KeyError in the schedulers
    before = teacher.final_states(seqs, pos)[0]
    teacher.sleep()
    rollout.generate([[1, 2, 3]], n_samples_per_prompt=1, max_new_tokens=8, temperature=1.0,
                     top_p=1.0, seed=0)
    rollout.sleep()
    teacher.wake()
    after = teacher.final_states(seqs, pos)[0]
    backup = float((after - before).abs().max())
    row("teacher states after sleep + wake", f"max abs diff {backup:.2e} "
        f"({'kept' if backup == 0 else 'CHANGED'}: enable_weights_cpu_backup)")
    import glob
    import os

    state = {}
    for f in sorted(glob.glob(os.path.join(args.model, "*.safetensors"))):
        state.update(load_file(f))
    teacher.sleep()
    with teacher.awake():  # self-distillation's push into a sleeping teacher
        teacher.load_weights([(k, v.to(torch.bfloat16)) for k, v in list(state.items())[:4]],
                             flush_cache=True)
    row("push into the sleeping teacher", f"through awake(), state now {teacher.state}")
    rollout.wake()
    env = DistEnv(0, 1, 0, torch.device("cuda"))
    pushed = push(state, rollout, env, bucket_bytes=64 * 2**20, dtype=rollout.compute_dtype)
    out = rollout.generate([[1, 2, 3]], n_samples_per_prompt=2, max_new_tokens=8,
                           temperature=1.0, top_p=1.0, seed=0)
    row("rollout after sleep, wake, bucketed push", f"{pushed / 2**20:.0f} MiB pushed, "
        f"{len(out)} samples, finish {sorted({s.finish_reason for s in out})}")


def check_states_vs_hf(cfg, args, teacher) -> None:
    import torch

    from kubedistill.models import load_causal_lm

    g = torch.Generator().manual_seed(0)
    lengths = [args.seq, args.seq // 2, args.budget + args.seq // 2, 17]  # one over budget
    seqs = [torch.randint(100, 20000, (n,), generator=g).tolist() for n in lengths]
    pos = [list(range(n)) for n in lengths]
    got = teacher.final_states(seqs, pos)
    model = load_causal_lm(args.model, dtype=torch.bfloat16, device="cuda",
                           attn_implementation="sdpa")
    worst = cos = lp = 0.0
    with torch.inference_mode():
        for s, h in zip(seqs, got, strict=True):
            ref = model.model(torch.tensor([s], device="cuda")).last_hidden_state[0].float().cpu()
            worst = max(worst, float((h - ref).abs().max()))
            cos = max(cos, float(1 - torch.nn.functional.cosine_similarity(h, ref).min()))
            a = torch.log_softmax(teacher.head.logits(h), -1)
            b = torch.log_softmax(teacher.head.logits(ref), -1)
            lp = max(lp, float((a - b).abs().max()))
    del model
    row("teacher states vs HF (bf16)", f"lengths {lengths} (budget {args.budget}): max abs "
        f"{worst:.3e}, max 1-cos {cos:.2e}, max |dlogprob| {lp:.3f}, "
        f"norm applied here: {teacher.apply_norm}")


def check_max_new_tokens(teacher) -> None:
    import torch

    prompt = list(range(200, 264))
    blocks = {}
    for n in (0, 1):
        out = teacher.engine.generate(input_ids=[prompt], return_hidden_states=True,
                                      sampling_params={"max_new_tokens": n,
                                                       "temperature": 0.0})
        out = out[0] if isinstance(out, list) else out
        hidden = out["meta_info"]["hidden_states"]
        blocks[n] = [torch.as_tensor(b, dtype=torch.float32) for b in hidden]
    shapes = {n: [tuple(b.shape) for b in bl] for n, bl in blocks.items()}
    same = blocks[0][0].shape == blocks[1][0].shape and torch.equal(blocks[0][0], blocks[1][0])
    row("max_new_tokens 0 vs 1", f"0 -> blocks {shapes[0]}, 1 -> blocks {shapes[1]}, "
        f"prefill blocks equal: {same}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model directory (teacher and rollout student)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--mem-fraction", type=float, default=0.25,
                   help="mem_fraction_static of EACH engine (two share the GPU)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--budget", type=int, default=2048, help="teacher_batch_tokens")
    args = p.parse_args(argv)
    if importlib.util.find_spec("sglang") is None:
        print("sglang_check: sglang is not installed here; run it on a GPU node with the "
              "GPU image (pip install '.[gpu]')", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("sglang_check: no CUDA device", file=sys.stderr)
        return 2
    if not args.model:
        p.error("--model DIR is required")
    from kubedistill.lifecycle import close_all
    from kubedistill.rollout.sglang import SGLangRolloutEngine
    from kubedistill.rollout.sglang import engine_kwargs as rollout_kwargs
    from kubedistill.sglang_engine import check_shared_settings
    from kubedistill.teacher.sglang import SGLangTeacherEngine
    from kubedistill.teacher.sglang import engine_kwargs as teacher_kwargs

    cfg = make_config(args)
    check_shared_settings([teacher_kwargs(cfg, args.model), rollout_kwargs(cfg, args.model)])
    started = time.perf_counter()
    teacher = SGLangTeacherEngine.from_config(cfg, args.model)  # runs the post-norm probe
    rollout = SGLangRolloutEngine.from_config(cfg, args.model)
    try:
        check_max_new_tokens(teacher)
        check_states_vs_hf(cfg, args, teacher)
        check_lifecycle(cfg, args, teacher, rollout)
    finally:
        close_all([rollout, teacher])
    row("close_all (two engines, one process)", "both closed, this process survived")
    import sglang

    print(f"sglang_check: sglang {sglang.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.perf_counter() - started:.0f} s")
    print("| check | result |")
    print("|---|---|")
    for check, result in ROWS:
        print(f"| {check} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
