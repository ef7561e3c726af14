"""Building prepared rows in worker processes (``data.preprocess_num_workers``).

:class:`RowBuilder` runs :meth:`SampleBuilder.build <kubedistill.data.build.SampleBuilder.build>`
over a list of items in order. Contract: :meth:`RowBuilder.build` returns exactly the rows a
plain loop over the items would, in item order, and leaves the parent's builder with exactly
the state that loop would (bad rows in order, length and alignment counters, filtered ids,
largest token id), so the prepared files are byte-identical whatever the worker count.

How: with more than one worker and at least :data:`MIN_PARALLEL_ROWS` items to build, the
items are cut into contiguous chunks (at most :data:`MAX_CHUNK_ROWS` each) that go, records
and all, to a pool of ``spawn``-ed processes (fork does not mix with torch/tokenizers
threads). Each worker rebuilds the tokenizer pair and its own builder once
(``load_pair(cfg)``), builds a chunk, and returns its rows with its builder's exported
state; the parent takes the results in chunk order, with at most :data:`AHEAD_PER_WORKER`
chunks per worker submitted ahead (bounded memory), and merges them. A chunk in which a
worker met a DataError (``on_bad_row: fail``), or which reaches an item ``limit``, is rebuilt
in the parent, which raises the first error in plan order exactly as a single-process run
would, or stops at the limit at the same item. If the pool breaks (a worker killed, e.g. out
of memory, or a script without the ``if __name__ == "__main__":`` guard that ``spawn``
needs), the rest is built in the parent, with a warning.

The worker count is ``min(preprocess_num_workers, CPUs this process may use)`` (affinity
mask and a cgroup CPU quota, i.e. a container's CPU limit); below :data:`MIN_PARALLEL_ROWS`
items one process is used: starting the workers (interpreter, imports including torch,
tokenizer load: ~5-12 s, ~0.4 GB each) costs as much as building several thousand rows at
the ~500-1,200 rows/s chat templates allow, so smaller inputs would only get slower.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from kubedistill.config import Config
from kubedistill.data.build import SampleBuilder
from kubedistill.data.formats import Record, Source
from kubedistill.errors import DataError
from kubedistill.procs import bind_to_parent

log = logging.getLogger(__name__)

MIN_PARALLEL_ROWS = 8192  # fewer items to build: one process (worker start-up would dominate)
MAX_CHUNK_ROWS = 256  # items per task sent to a worker
CHUNKS_PER_WORKER = 4  # smaller chunks for small inputs, so every worker gets some
AHEAD_PER_WORKER = 2  # chunks submitted but not yet taken, per worker

Item = tuple[Source, Record, str, Any]  # (source, record, id suffix, key returned with the row)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(n, quota or n))


def _cgroup_cpus() -> int | None:
    """Whole CPUs of the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, \
                    open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
                quota, period = q.read().strip(), p.read().strip()
        except OSError:
            return None
    if not (quota.isdigit() and period.isdigit()):  # "max" / -1: no quota
        return None
    return max(1, int(quota) // max(1, int(period)))


class RowBuilder:
    """Builds rows with ``builder`` in this process or a worker pool; use as a context
    manager (the pool, started on first need, is shut down on exit)."""

    def __init__(self, cfg: Config, builder: SampleBuilder):
        self.cfg, self.builder = cfg, builder
        self.workers = max(1, min(int(cfg.data.preprocess_num_workers or 1), available_cpus()))
        self._pool = None

    def __enter__(self) -> RowBuilder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            # no waiting for the workers to exit (seconds: torch teardown); chunks queued
            # past a limit are cancelled, those running finish and are dropped
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def build(self, items: list[Item], split: str, limit: int | None = None,
              desc: str = "") -> list[tuple[Any, dict[str, Any]]]:
        """``(key, row)`` for each item that gives a row, in item order; building stops once
        ``limit`` rows are made (later items are not built, so not reported either)."""
        wanted = len(items) if limit is None else min(len(items), limit)
        bar = (tqdm(total=len(items), desc=desc, unit="row", mininterval=1.0) if limit is None
               else tqdm(total=limit, desc=desc, unit="row", mininterval=1.0))
        out: list[tuple[Any, dict[str, Any]]] = []
        with bar:
            if self.workers > 1 and wanted >= MIN_PARALLEL_ROWS:
                self._parallel(items, split, limit, bar, out)
            else:
                self._sequential(items, split, limit, bar, out)
        return out

    # ---- the two ways ------------------------------------------------------------------
    def _sequential(self, items: list[Item], split: str, limit: int | None, bar,
                    out: list) -> None:
        for source, record, suffix, key in items:
            if limit is not None and len(out) >= limit:
                return
            row = self.builder.build(source, record, split, suffix)
            if row is not None:
                out.append((key, row))
            if row is not None or limit is None:
                bar.update()

    def _parallel(self, items: list[Item], split: str, limit: int | None, bar,
                  out: list) -> None:
        size = max(1, min(MAX_CHUNK_ROWS,
                          math.ceil(len(items) / (self.workers * CHUNKS_PER_WORKER))))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        log.info("prepare: building %d %s rows in %d worker processes (%d chunks)",
                 len(items), split, self.workers, len(chunks))
        tasks, pending = _tasks(chunks, split), deque()
        for n, chunk in enumerate(chunks):
            try:
                while len(pending) < self.workers * AHEAD_PER_WORKER:
                    task = next(tasks, None)
                    if task is None:
                        break
                    pending.append(self._start().submit(_work, task))
                rows, state = pending.popleft().result()
            except BrokenProcessPool as exc:
                log.warning("prepare: the worker processes failed (%s); building the remaining "
                            "%d rows in this process (a script calling prepare with "
                            "preprocess_num_workers > 1 needs the if __name__ == "
                            "'__main__': guard)", exc, len(items) - n * size)
                self.close()
                self.workers = 1
                self._sequential(items[n * size:], split, limit, bar, out)
                return
            made = sum(r is not None for r in rows or ())
            if rows is None or (limit is not None and len(out) + made >= limit):
                # a bad row with on_bad_row: fail (raises here, in plan order) or the limit
                self._sequential(chunk, split, limit, bar, out)
                if limit is not None and len(out) >= limit:
                    return
                continue
            self.builder.merge_state(state)
            out.extend((item[3], row) for item, row in zip(chunk, rows, strict=True)
                       if row is not None)
            bar.update(made if limit is not None else len(chunk))

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init, initargs=(self.cfg, os.getpid()))
        return self._pool


def _tasks(chunks: list[list[Item]], split: str) -> Iterator[tuple]:
    """One picklable task per chunk: the chunk's sources without their records (the
    builder needs names and file lists only) and ``(source index, record, suffix)``."""
    for chunk in chunks:
        sources: dict[int, Source] = {}
        entries = []
        for source, record, suffix, _ in chunk:
            if id(source) not in sources:
                sources[id(source)] = replace(source, records=[])
            entries.append((id(source), record, suffix))
        yield split, sources, entries


# ---- in the worker processes ---------------------------------------------------------------
_BUILDER: SampleBuilder | None = None


def _init(cfg: Config, parent: int) -> None:
    """Worker start: quiet logs (the parent already reported the preflight), load the pair."""
    global _BUILDER
    bind_to_parent(parent=parent)  # a killed stage leaves no data-prep worker behind
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.getLogger("kubedistill").setLevel(logging.ERROR)
    from kubedistill.data.preflight import load_pair

    _BUILDER = SampleBuilder(cfg, load_pair(cfg))


def _work(task: tuple) -> tuple[list | None, dict | None]:
    """Build one chunk: (rows or None per item, exported state); (None, None) when a bad
    row raised DataError (``on_bad_row: fail``) — the parent rebuilds the chunk to raise."""
    split, sources, entries = task
    try:
        rows = [_BUILDER.build(sources[s], record, split, suffix)
                for s, record, suffix in entries]
    except DataError:
        _BUILDER.export_state()  # discard the partial chunk
        return None, None
    return rows, _BUILDER.export_state()
