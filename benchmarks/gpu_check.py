"""One GPU check that runs in minutes: the runtime's GPU path on one accelerator, one table.

    python benchmarks/gpu_check.py                 # one GPU (sizes for an H200, < 8 min)
    python benchmarks/gpu_check.py --tiny          # CPU, tiny sizes (the test suite runs it)
    python benchmarks/gpu_check.py --model DIR     # a real HF model dir as the student

Needs only torch, transformers, pyarrow, fsspec and the runtime (no kfp, mlflow, sglang or
flash-attn; liger-kernel is used when it imports). Rows of the table:

1. **student training** (SFT, the real ``Trainer``: FSDP2 world of one, bf16 mixed precision
   on CUDA): median step time over ``--steps`` steps after a warm-up, tokens/s, and MFU =
   tokens/s x (6 N + 6 L d T) / ``--peak-tflops`` (N = parameters that compute, L layers,
   d width, T sequence length; causal attention counted at half);
2. **KD loss** at each ``--vocab``: ``fused_kd_loss`` chunked (1024) vs unchunked vs Liger's
   ``LigerFusedLinearJSDLoss`` (JSD beta 0.5 + CE, the same function), forward + backward:
   median time, peak memory (CUDA: ``max_memory_allocated`` above the inputs; CPU: not
   measured), loss difference to unchunked;
3. **teacher cache** (``hf`` backend, the real stage): tokens/s, and bit-fidelity: every
   cached state equals, bit for bit, the engine's own output rounded to the cache dtype;
4. **off-policy step** from that cache (``vanilla_kd``): median step time and tokens/s;
5. **flash-attn fallback**: ``flash_attention_2`` requested for a float32 model resolves to
   ``sdpa`` and the model runs; for bf16 it stays flash-attn when flash-attn imports.

The student is ``--model`` or, by default, a randomly initialised model with SmolLM2-135M's
exact configuration (timing and MFU depend on shapes, not on weight values); prompts are
random token ids, so no tokenizer is needed. The teacher is a second random model of the
same shape (``--tiny``: tiny widths).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1024, tie_word_embeddings=True,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)


@dataclass
class Sizes:
    seq: int
    rows: int
    train_batch: int
    micro_batch: int
    steps: int
    loss_tokens: int
    loss_hidden: int
    vocabs: tuple[int, ...]
    loss_repeats: int


GPU_SIZES = Sizes(seq=1024, rows=512, train_batch=32, micro_batch=8, steps=8,
                  loss_tokens=8192, loss_hidden=1024, vocabs=(49152, 151936), loss_repeats=3)
TINY_SIZES = Sizes(seq=32, rows=16, train_batch=4, micro_batch=2, steps=2, loss_tokens=64,
                   loss_hidden=32, vocabs=(1024, 2048), loss_repeats=1)
ROWS: list[tuple[str, str, str]] = []


def row(check: str, setting: str, result: str) -> None:
    ROWS.append((check, setting, result))
    print(f"  {check}: {setting}: {result}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- setup: models and data ----------------------------------------------------------------
def random_model(out_dir: str, shape: dict, seed: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_prepared(out_dir: str, rows: int, seq: int, vocab: int, seed: int = 0) -> str:
    """Random-token chats: prompt = the first quarter, loss on the rest (the contract of
    docs/contracts.md; no manifest, so the cache key hashes the parquet files)."""
    import pyarrow.parquet as pq

    from kubedistill.data.prepared import to_table

    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    for split, n in (("train", rows), ("eval", max(2, rows // 8))):
        items = []
        for i in range(n):
            length = int(rng.integers(seq // 2, seq + 1))
            prompt = length // 4
            items.append({"id": f"{split}:{i}", "input_ids": rng.integers(3, vocab, length)
                          .tolist(), "prompt_len": prompt, "response": "",
                          "loss_mask": [0] * prompt + [1] * (length - prompt)})
        pq.write_table(to_table(items), os.path.join(out_dir, f"{split}.parquet"))
    return out_dir


def config(work: str, name: str, device: str, **over):
    from kubedistill.config import Config

    cfg, wd = Config(), os.path.join(work, name)
    base = dict(work_dir=wd, save_path=os.path.join(wd, "model"),
                ckpt_path=os.path.join(wd, "ckpt"), tracking_uri="off", device=device,
                num_gpus_per_node=1, learning_rate=1e-4, lr_warmup_ratio=0.0, seed=0,
                bf16=device == "cuda", attn_implementation="flash_attention_2")
    cfg.update({**base, **over})
    return cfg


# ---- 1 and 4: training steps ---------------------------------------------------------------
def time_steps(trainer, steps: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per optimizer step, tokens/s) over ``steps`` after one warm-up."""
    times, tokens = [], []
    for i in range(steps + 1):
        plan = trainer.next_plan()
        sync(device)
        start = time.perf_counter()
        metrics = trainer.train_step(plan)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
            tokens.append(metrics["train/tokens"])
        trainer.advance(plan, metrics)
    step = statistics.median(times)
    return step, statistics.median(tokens) / step


def flops_per_token(model_config, n_params: int, seq: int) -> float:
    d, layers = model_config.hidden_size, model_config.num_hidden_layers
    embed = 0 if model_config.tie_word_embeddings else model_config.vocab_size * d
    return 6 * (n_params - embed) + 6 * layers * d * seq


def check_student(args, sizes: Sizes, env, work: str, student: str, prepared: str) -> None:
    from kubedistill.train.trainer import Trainer

    cfg = config(work, "sft", env.device.type, student_name_or_path=student,
                 prepared_path=prepared, kd_algorithm="sft", kd_ratio=0.0,
                 train_batch_size=sizes.train_batch, micro_train_batch_size=sizes.micro_batch,
                 max_steps=sizes.steps + 1)
    trainer = Trainer(cfg, env)
    step, tps = time_steps(trainer, sizes.steps, env.device)
    student_model = trainer.module.student
    n = sum(p.numel() for p in student_model.parameters())
    setting = (f"{n / 1e6:.1f}M params, {sizes.train_batch}x<={sizes.seq} tok, "
               f"{'bf16' if cfg.train.bf16 else 'fp32'} FSDP2, "
               f"attn {student_model.config._attn_implementation}")
    mfu = ""
    if env.device.type == "cuda":
        achieved = tps * flops_per_token(student_model.config, n, sizes.seq)
        mfu = f", MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}% of " \
              f"{args.peak_tflops:g} TFLOPS"
    row("student training (SFT)", setting, f"{step * 1e3:.1f} ms/step, {tps:,.0f} tok/s{mfu}")
    del trainer


def check_off_policy(sizes: Sizes, env, work: str, student: str, teacher: str,
                     prepared: str, cache: str) -> None:
    from kubedistill.train.trainer import Trainer

    cfg = config(work, "kd", env.device.type, student_name_or_path=student,
                 teacher_name_or_path=teacher, prepared_path=prepared,
                 teacher_cache_path=cache, kd_algorithm="vanilla_kd", kd_ratio=0.5,
                 kd_loss_fn="kl", train_batch_size=sizes.train_batch,
                 micro_train_batch_size=sizes.micro_batch, max_steps=sizes.steps + 1)
    trainer = Trainer(cfg, env)
    step, tps = time_steps(trainer, sizes.steps, env.device)
    row("off-policy step from the cache", f"vanilla_kd (kl, 0.5), {sizes.train_batch} rows",
        f"{step * 1e3:.1f} ms/step, {tps:,.0f} tok/s")
    del trainer


# ---- 2: the KD loss --------------------------------------------------------------------------
def kd_loss_cases(vocab: int, n: int, d: int, device: torch.device, dtype: torch.dtype):
    """``({name: fwd+bwd closure}, h, w)`` for one vocabulary size (seeded inputs)."""
    from kubedistill.losses import fused_kd_loss
    from kubedistill.teacher.head import TeacherHead

    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    ht = torch.randn(n, d, generator=g).to(device, dtype)
    wt = (torch.randn(vocab, d, generator=g) / d**0.5).to(device, dtype)
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    head = TeacherHead(wt)

    def ours(chunk):
        return lambda: fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits,
                                     loss_fn="jsd", kd_ratio=0.5, temperature=1.0,
                                     kd_scale=1.0, hparams={"jsd_beta": 0.5},
                                     chunk_size=chunk).loss

    cases = {"chunked": ours(1024), "unchunked": ours(None)}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return cases, h, w
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                    temperature=1.0, chunk_size=1024,
                                    compiled=device.type == "cuda")
    cases["liger"] = lambda: liger(h, w, ht, wt, y)
    return cases, h, w


def check_kd_loss(sizes: Sizes, device: torch.device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, d = sizes.loss_tokens, sizes.loss_hidden
    for vocab in sizes.vocabs:
        cases, h, w = kd_loss_cases(vocab, n, d, device, dtype)
        if "liger" not in cases:
            row(f"KD loss V={vocab:,}", "liger", "not run: liger-kernel is not installed")
        results = {}
        for name, fn in cases.items():
            try:
                results[name] = time_loss(fn, h, w, sizes.loss_repeats, device)
            except Exception as exc:  # e.g. torch.compile without a compiler: report, go on
                row(f"KD loss V={vocab:,}", name, f"failed: {type(exc).__name__}: "
                    f"{(str(exc).splitlines() or [''])[0][:120]}")
        del cases, h, w
        ref = results.get("unchunked", (0.0, 0.0, None))[2]
        for name, (sec, peak, loss) in results.items():
            mem = f", peak {peak:,.0f} MiB" if device.type == "cuda" else ""
            diff = "n/a" if ref is None else f"{abs(loss - ref) / max(abs(ref), 1e-12):.1e}"
            row(f"KD loss V={vocab:,}", f"{name}, N={n} d={d} {str(dtype)[6:]}",
                f"{sec * 1e3:.1f} ms fwd+bwd{mem}, loss rel. diff to unchunked {diff}")


def time_loss(fn, h, w, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(median s of forward + backward, peak MiB above the inputs (CUDA), loss)."""
    times, peak = [], 0.0
    for i in range(repeats + 1):
        h.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
    return statistics.median(times), peak, float(loss.detach())


# ---- 3: the teacher cache ----------------------------------------------------------------------
def check_cache(sizes: Sizes, env, work: str, teacher: str, prepared: str) -> str:
    from kubedistill.teacher import cache as stage
    from kubedistill.teacher.engine import load_hf_teacher
    from kubedistill.teacher.hf import HFTeacherEngine
    from kubedistill.teacher.reader import TeacherCache

    cache_uri = os.path.join(work, "cache")
    cfg = config(work, "cache", env.device.type, teacher_name_or_path=teacher,
                 prepared_path=prepared, teacher_cache_path=cache_uri, teacher_backend="hf",
                 cache_dtype="bf16", teacher_batch_tokens=8 * sizes.seq,
                 cache_rows_per_shard=max(4, sizes.rows // 4))
    sync(env.device)
    start = time.perf_counter()
    stage.cache_teacher(cfg)
    sync(env.device)
    seconds = time.perf_counter() - start
    # bit-fidelity: the engine's own states for every shard, rounded to bf16, vs the cache
    engine = HFTeacherEngine(load_hf_teacher(cfg, teacher), batch_tokens=8 * sizes.seq)
    cache = TeacherCache(cache_uri)
    worst, rows_checked = 0.0, 0
    splits = {s: stage.read_teacher_rows(prepared, s) for s in stage.SPLITS}
    for plan in stage.plan_shards(splits, cfg.cache.cache_rows_per_shard):
        rows, sl = splits[plan.split], slice(plan.row_start, plan.row_end)
        states = engine.final_states(rows.tokens[sl], rows.positions[sl])
        for sid, h in zip(rows.ids[sl], states, strict=True):
            got = cache.get(sid, split=plan.split).hidden
            want = h.to(torch.bfloat16).float()
            worst = max(worst, float((got - want).abs().max()) if got.numel() else 0.0)
            rows_checked += 1
    engine.close()
    tokens = sum(len(t) for r in splits.values() for t in r.tokens)
    row("teacher cache (hf, bf16)", f"{rows_checked} rows, {tokens:,} tokens, stage end to end",
        f"{tokens / seconds:,.0f} tok/s; bit-exact {'yes' if worst == 0 else 'NO'} "
        f"(max abs diff {worst:.1e})")
    return cache_uri


# ---- 5: flash-attn and float32 ------------------------------------------------------------------
def check_attention(device: torch.device, model_dir: str) -> None:
    from kubedistill.models import load_causal_lm
    from kubedistill.models.loading import resolve_attn_implementation

    fa = "flash_attention_2"
    fp32 = resolve_attn_implementation(fa, device.type, torch.float32)
    bf16 = resolve_attn_implementation(fa, device.type, torch.bfloat16)
    model = load_causal_lm(model_dir, dtype=torch.float32, device=str(device),
                           attn_implementation=fa)
    with torch.inference_mode():
        out = model(torch.arange(3, 19, device=device)[None]).logits
    ok = fp32 == "sdpa" and model.config._attn_implementation == "sdpa" and \
        bool(torch.isfinite(out).all())
    row("flash-attn fallback", "flash_attention_2 requested",
        f"fp32 -> {fp32} (model ran: {'yes' if ok else 'NO'}), bf16 -> {bf16}")
    if not ok:
        raise SystemExit("flash-attn fallback check failed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes (the test suite)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", help="student HF model directory (default: SmolLM2-135M shape, "
                                   "random weights)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the accelerator (H100/H200 SXM: 989)")
    p.add_argument("--work-dir", help="keep the run's files here (default: a temp dir)")
    args = p.parse_args(argv)
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    device = "cpu" if args.tiny and args.device == "auto" else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from kubedistill.train.fsdp import close, init_distributed

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        shape = TINY if args.tiny else SMOLLM2_135M
        student = args.model or random_model(os.path.join(work, "student"), shape, seed=0)
        teacher = random_model(os.path.join(work, "teacher"), shape, seed=1)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(student).vocab_size
        prepared = write_prepared(os.path.join(work, "prepared"), sizes.rows, sizes.seq, vocab)
        env = init_distributed(device)
        try:
            check_student(args, sizes, env, work, student, prepared)
            check_kd_loss(sizes, env.device)
            teacher_for_cache = student if args.model else teacher
            cache = check_cache(sizes, env, work, teacher_for_cache, prepared)
            check_off_policy(sizes, env, work, student, teacher_for_cache, prepared, cache)
            check_attention(env.device, student)
        finally:
            close()
    name = torch.cuda.get_device_name() if env.device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| check | setting | result |")
    print("|---|---|---|")
    for check, setting, result in ROWS:
        print(f"| {check} | {setting} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
