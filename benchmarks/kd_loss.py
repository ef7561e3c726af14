"""KD loss: forward + backward time and peak memory of the lm_head + CE + JSD loss.

Three implementations of the same function, on the same inputs (student hidden h [N, d],
student lm_head W [V, d], teacher hidden [N, d_t] + teacher lm_head [V, d_t], targets):

    loss = 1/N sum_i [ 0.5 * CE(W h_i, y_i) + 0.5 * JSD_0.5(p_T,i || p_S,i) ]   (T = 1)

* ``chunked``   kubedistill.losses.fused_kd_loss(chunk_size=1024)  (the default path)
* ``unchunked`` the same with chunk_size=None: full [N, V] logits, plain autograd (what the
                reference design, KDFlow, does)
* ``liger``     liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(compiled=False,
                chunk_size=1024); its JSD_beta = beta KL(p_T||m) + (1-beta) KL(p_S||m) with
                m = beta p_T + (1-beta) p_S, CE/JSD weighted by weight_hard/soft_loss and
                divided by the token count: the same function at beta = 0.5.

Each case runs in a fresh subprocess. Peak memory is ``ru_maxrss`` (the process's resident
high-water mark) at the end minus ``ru_maxrss`` once the inputs exist: the extra memory the
loss needs, the gradients of h and W included. Time is the median of ``--repeats`` runs after
one warm-up. The parent checks that the three agree (loss and sampled gradient entries).

    .venv/bin/python benchmarks/kd_loss.py                       # V = 49,152 and 151,936
    .venv/bin/python benchmarks/kd_loss.py --vocab 49152 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ("chunked", "unchunked", "liger")


def child(args) -> dict:
    import torch

    from kubedistill.losses import fused_kd_loss
    from kubedistill.teacher.head import TeacherHead

    torch.manual_seed(0)
    n, d, dt, v = args.tokens, args.hidden, args.teacher_hidden, args.vocab
    h = (torch.randn(n, d)).requires_grad_()
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    ht = torch.randn(n, dt)
    wt = torch.randn(v, dt) / dt**0.5
    y = torch.randint(0, v, (n,))
    head = TeacherHead(wt)

    if args.case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                        temperature=1.0, compiled=False,
                                        chunk_size=args.chunk)

        def step():
            return liger(h, w, ht, wt, y)
    else:
        chunk = args.chunk if args.case == "chunked" else None

        def step():
            return fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits,
                                 loss_fn="jsd", kd_ratio=0.5, temperature=1.0, kd_scale=1.0,
                                 hparams={"jsd_beta": 0.5}, chunk_size=chunk).loss

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for i in range(args.repeats + 1):
        h.grad = w.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        loss.backward()
        if i:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": args.case, "vocab": v, "time_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times),
            "peak_mib": (peak - baseline) / 1024, "loss": float(loss.detach()),
            "gh": h.grad[:: max(1, n // 16), :4].flatten().tolist(),
            "gw": w.grad[:: max(1, v // 16), :4].flatten().tolist()}


def max_rel(a: list[float], b: list[float]) -> float:
    scale = max(abs(x) for x in b) or 1.0
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) / scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=CASES)  # internal: run one case, print JSON
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--repeats", type=int, nargs="+", default=[3, 1],
                   help="timed runs per vocab size (after one warm-up)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--teacher-hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                   help="ratios are to unchunked when it runs, else to the last case")
    args = p.parse_args()
    if args.case:
        args.vocab, args.repeats = args.vocab[0], args.repeats[0]
        print(json.dumps(child(args)))
        return
    repeats = args.repeats + [args.repeats[-1]] * (len(args.vocab) - len(args.repeats))
    import torch

    print(f"N={args.tokens} d={args.hidden} d_t={args.teacher_hidden} chunk={args.chunk} "
          f"torch {torch.__version__} threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    print("| V | N | case | wall s | CPU s | CPU x ref | peak MiB | peak x ref | loss "
          "| max rel diff to ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for vocab, reps in zip(args.vocab, repeats, strict=True):
        results = {}
        for case in args.cases:
            cmd = [sys.executable, __file__, "--case", case, "--vocab", str(vocab),
                   "--repeats", str(reps), "--tokens", str(args.tokens), "--hidden",
                   str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
                   "--chunk", str(args.chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        ref_name = "unchunked" if "unchunked" in results else args.cases[-1]
        ref = results[ref_name]
        for case in args.cases:
            r = results[case]
            diff = max(abs(r["loss"] - ref["loss"]) / abs(ref["loss"]),
                       max_rel(r["gh"], ref["gh"]), max_rel(r["gw"], ref["gw"]))
            print(f"| {vocab:,} | {args.tokens} | {case} | {r['time_s']:.1f} | "
                  f"{r['cpu_s']:.1f} | {r['cpu_s'] / ref['cpu_s']:.2f} ({ref_name}) | "
                  f"{r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f} | "
                  f"{r['loss']:.6f} | {diff:.1e} |", flush=True)

if __name__ == "__main__":
    main()
