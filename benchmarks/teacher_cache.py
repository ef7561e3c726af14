"""Teacher-cache benchmark: stage overhead, bytes per token, reader throughput.

    .venv/bin/python benchmarks/teacher_cache.py [--samples 64] [--tokens 128]

On the real SmolLM2-135M-Instruct teacher (``kubedistill models import`` first) over
GSM8K samples chat-templated and cut to ``--tokens`` tokens, prints one markdown table:

- teacher forward tokens/s: the bare batched forward the stage runs (``HFTeacherEngine``
  over each shard's rows), against the whole cache-teacher loop (forward + encode + Arrow
  write + sha256 + marker commit), and the overhead between them; because separate runs
  drift with the machine's load, the overhead is also given within one run (loop time vs
  time inside the engine call) and the stage's own work is timed alone (a second bf16 run
  that replays the remembered teacher states) as a share of the forward time;
- bytes per cached position and per teacher token for bf16, fp16, fp32, fp8 and bf16 with
  top-64 log-probs (the later dtypes replay the teacher states of the first run);
- reader throughput (``TeacherCache.iter``, decode to float32) from local disk and from S3
  (a moto server started here), in cached positions per second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the prepared-data writer of the tests

from _prepared import write_prepared  # noqa: E402

from kubedistill import storage  # noqa: E402
from kubedistill.config import load_config  # noqa: E402
from kubedistill.models.packaged import ensure_imported  # noqa: E402
from kubedistill.teacher import cache as stage  # noqa: E402
from kubedistill.teacher.hf import HFTeacherEngine  # noqa: E402
from kubedistill.teacher.reader import TeacherCache  # noqa: E402


class Replay:
    """The real engine on first sight of an input, its remembered answer afterwards."""

    def __init__(self, engine: HFTeacherEngine):
        self.engine, self.hidden_size, self.memo = engine, engine.hidden_size, {}
        self.seconds = 0.0  # spent in the real engine

    def final_states(self, sequences, positions):
        key = tuple(tuple(s.tolist()) for s in sequences)
        if key not in self.memo:
            t = time.perf_counter()
            self.memo[key] = self.engine.final_states(sequences, positions)
            self.seconds += time.perf_counter() - t
        return self.memo[key]

    def close(self) -> None:
        pass


def read_rate(uri: str, ids: list[str]) -> float:
    cache = TeacherCache(uri)
    start, n = time.perf_counter(), 0
    for st in cache.iter(ids, prefetch=4):
        n += st.hidden.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rows_per_shard", type=int, default=16)
    args = parser.parse_args()
    teacher = ensure_imported("smollm2-135m-instruct")
    root = tempfile.mkdtemp(prefix="kd-bench-")
    prepared = write_prepared(os.path.join(root, "prepared"), teacher, n_train=args.samples,
                              n_eval=0, max_tokens=args.tokens)
    model = stage.load_hf_teacher(load_config(None, {"attn_implementation": "sdpa"}), teacher)
    engine = HFTeacherEngine(model, batch_tokens=4096)
    rows = stage.read_teacher_rows(prepared, "train")
    plans = stage.plan_shards({"train": rows, "eval": stage.TeacherRows([], [], [])},
                              args.rows_per_shard)
    n_tokens = sum(p.tokens for p in plans)
    engine.final_states(rows.tokens[:4], rows.positions[:4])  # warm-up

    def bare_rate() -> float:
        t = time.perf_counter()
        for p in plans:
            engine.final_states(rows.tokens[p.row_start:p.row_end],
                                rows.positions[p.row_start:p.row_end])
        return n_tokens / (time.perf_counter() - t)

    bare_before = bare_rate()

    replay = Replay(engine)
    stage.load_hf_teacher = lambda cfg, path: model
    stage.make_engine = lambda cfg, path, model=None: replay
    results = {}
    for name, extra in (("bf16", {}), ("bf16 replay", {}), ("fp16", {"cache_dtype": "fp16"}),
                        ("fp32", {"cache_dtype": "fp32"}), ("fp8", {"cache_dtype": "fp8"}),
                        ("bf16+top64", {"cache_topk": 64})):
        cfg = load_config(None, {"teacher_name_or_path": teacher, "prepared_path": prepared,
                                 "teacher_cache_path": os.path.join(root, name.replace(" ", "_")),
                                 "cache_rows_per_shard": args.rows_per_shard,
                                 "attn_implementation": "sdpa", **extra})
        results[name] = stage.cache_teacher(cfg)
    staged = results["bf16"]["tokens_per_s"]
    bare = (bare_before + bare_rate()) / 2  # bare runs before and after the stage, averaged

    ids = TeacherCache(os.path.join(root, "bf16")).sample_ids()
    local_rate = read_rate(os.path.join(root, "bf16"), ids)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_DEFAULT_REGION="us-east-1")
    fs, _ = storage.filesystem("s3://bench")
    fs.mkdir("bench")
    storage.upload_dir(os.path.join(root, "bf16"), "s3://bench/cache")
    s3_rate = read_rate("s3://bench/cache", ids)
    server.stop()

    positions = results["bf16"]["positions"]
    print(f"\nSmolLM2-135M-Instruct teacher, {args.samples} samples, {n_tokens} teacher tokens, "
          f"{positions} cached positions, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| measure | value |\n|---|---|")
    print(f"| bare teacher forward (batched body, no logits; mean of a run before and after "
          f"the stage) | {bare:,.0f} tokens/s ({bare_before:,.0f} before) |")
    print(f"| cache-teacher loop (forward + encode + write + sha256 + commit) | "
          f"{staged:,.0f} tokens/s |")
    print(f"| stage overhead vs bare forward (separate runs) | {100 * (bare / staged - 1):+.1f}% |")
    inner = n_tokens / replay.seconds
    print(f"| teacher forward inside that stage run (timed around the engine call) | "
          f"{inner:,.0f} tokens/s |")
    print(f"| stage overhead vs its own forward (same run) | "
          f"{100 * (inner / staged - 1):+.1f}% |")
    extra_rate = results["bf16 replay"]["tokens_per_s"]
    print(f"| stage work beyond the forward alone (bf16 run replaying the states) | "
          f"{extra_rate:,.0f} tokens/s = {100 * bare / extra_rate:.1f}% of the forward time |")
    for name, out in results.items():
        if name == "bf16 replay":
            continue
        print(f"| shard bytes, {name} | {out['bytes'] / positions:,.0f} B/position, "
              f"{out['bytes'] / n_tokens:,.0f} B/teacher token |")
    print(f"| reader, local disk (mmap, bf16 -> fp32) | {local_rate:,.0f} positions/s |")
    print(f"| reader, S3 (moto on loopback, per-batch range GETs) | {s3_rate:,.0f} positions/s |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
