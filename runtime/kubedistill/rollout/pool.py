"""Several rollout engines behind the ``RolloutEngine`` interface (``rollout_num_engines > 1``).

``generate(prompts, ...)`` splits the prompts into ``len(engines)`` contiguous shards of
near-equal size (the first ``len(prompts) % k`` shards one longer), engine ``j`` samples shard
``j`` with seed ``seed * 1_000_003 + j`` (a seed of its own, deterministic for a given engine
count), and the samples come back prompt-major with ``prompt_index`` into the WHOLE prompt
list, as one engine would return them. ``images`` (image-text prompts) are split with
their prompts. Engines run one after another (SGLang's offline
``Engine.generate`` drives its own event loop on the calling thread); with SGLang each
engine owns its own GPUs, so a shard's generation is the only work on them.

Weights, sleep, wake and close go to every engine (closing under
:func:`kubedistill.lifecycle.close_all`). ``push_device`` is the first engine's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from kubedistill.lifecycle import close_all
from kubedistill.rollout.engine import RolloutEngine, Sample


def shard_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous ``[lo, hi)`` ranges covering ``range(n)``, sizes differing by <= 1."""
    base, extra = divmod(n, k)
    bounds, lo = [], 0
    for j in range(k):
        hi = lo + base + (1 if j < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class RolloutPool:
    def __init__(self, engines: Sequence[RolloutEngine]):
        if not engines:
            raise ValueError("a rollout pool needs at least one engine")
        self.engines = list(engines)
        self.push_device = getattr(self.engines[0], "push_device", None)

    def generate(self, prompts: Sequence[Sequence[int]], *, n_samples_per_prompt: int = 1,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, images: Sequence[Sequence[bytes] | None] | None = None,
                 ) -> list[Sample]:
        out: list[Sample] = []
        for j, (lo, hi) in enumerate(shard_bounds(len(prompts), len(self.engines))):
            if lo == hi:
                continue
            samples = self.engines[j].generate(
                prompts[lo:hi], n_samples_per_prompt=n_samples_per_prompt,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed * 1_000_003 + j,
                images=None if images is None else list(images[lo:hi]))
            for s in samples:
                s.prompt_index += lo
            out += samples
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     flush_cache: bool = True) -> None:
        bucket = list(named_tensors)
        for engine in self.engines:
            engine.load_weights(bucket, flush_cache=flush_cache)

    def sleep(self) -> None:
        for engine in self.engines:
            engine.sleep()

    def wake(self) -> None:
        for engine in self.engines:
            engine.wake()

    def close(self) -> None:
        close_all(self.engines)
        self.engines = []
