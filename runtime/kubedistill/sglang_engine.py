"""What the ``sglang`` teacher and rollout backends share: engine settings, the lifecycle
(sleep / wake / shutdown) and weight pushes of an in-process ``sglang.Engine``.

Nothing here imports sglang; the backends do, lazily. Facts this module relies on, read in
SGLang's source (``entrypoints/engine.py``, ``managers/scheduler_update_weights_mixin.py``,
``configs/model_config.py``):

- **dtype.** ``dtype="auto"`` maps a float32 checkpoint to float16 (``_get_and_verify_dtype``:
  "we use float16 for float32 models"). Our exported and derived models are float32 and
  the on-policy code assumes bf16, so every engine gets ``dtype=cfg.model.sglang_dtype``
  (default ``bfloat16``).
- **Release / resume.** ``release_memory_occupation(tags)`` adds the tags to the scheduler's
  ``offload_tags`` and pauses them in torch_memory_saver; ``resume_memory_occupation(tags)``
  REMOVES each tag (KeyError when it was never released: hence the state machine of
  :class:`~kubedistill.lifecycle.EngineLifecycle`). Pausing the ``weights`` tag frees the
  weights, it does not offload them: after resume they are garbage (SGLang issues #6367,
  #19442) unless the engine was built with ``enable_weights_cpu_backup=True`` (SGLang >=
  0.5.3, PR #10873), which copies them to host memory on release and back on resume. The
  rollout engine gets the student's weights pushed after every wake, so it needs no backup;
  a sleeping TEACHER does (:func:`needs_weights_backup`). torch_memory_saver must be
  installed where ``enable_memory_saver`` is on (the GPU image).
- **Weight pushes.** ``update_weights_from_tensor(named_tensors, flush_cache=True)`` flushes
  the KV/radix cache after loading when ``flush_cache`` is set. The cache only has to be
  invalid once all buckets are in (no request runs between two buckets: ``generate`` blocks
  and we are the only client), so every bucket but the last passes ``flush_cache=False``
  (SGLang's own docstring: "If there are going to be more updates, set flush_cache to be
  false").
- **Shutdown.** ``Engine.shutdown()`` kills every child process of the caller
  (``kill_process_tree(os.getpid(), include_parent=False)``); see
  :func:`kubedistill.lifecycle.close_all`.
- **Process-global configuration.** Launching an Engine publishes its ServerArgs as the
  process's runtime context ("This publish replaces whatever was published before it"), and
  the tokenizer manager of the FIRST engine then reads values of the SECOND one. The
  schedulers are separate processes with their own copy, so only what the main-process side
  reads must agree: :data:`PROCESS_GLOBAL_KEYS` are set identically for both engines
  (:func:`common_engine_kwargs`) and :func:`check_shared_settings` refuses engines that
  differ in them. Full isolation (one engine per process, as verl and slime do) is the
  alternative when a setting cannot be shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kubedistill.config import split_list
from kubedistill.errors import ConfigError
from kubedistill.lifecycle import EngineLifecycle

ALL_TAGS = ("kv_cache", "weights", "cuda_graph")  # sglang.srt.constants.GPU_MEMORY_ALL_TYPES
# Settings the main-process side of an Engine reads from the process-global context.
PROCESS_GLOBAL_KEYS = ("dtype", "skip_tokenizer_init", "enable_return_hidden_states",
                       "trust_remote_code", "enable_memory_saver", "log_level")
SGLANG_DTYPES = ("bfloat16", "float16", "float32", "auto")


def offload_tags(spec: str) -> list[str] | None:
    """``teacher_offload_tags`` -> the tags to release (None = every tag)."""
    tags = split_list(spec)
    if tags in ([], ["all"]):
        return None
    unknown = sorted(set(tags) - set(ALL_TAGS))
    if unknown:
        raise ConfigError(f"unknown SGLang memory tags {unknown}; use 'all' or a comma list "
                          f"of {', '.join(ALL_TAGS)}")
    return tags


def needs_weights_backup(enable_sleep: bool, tags: list[str] | None) -> bool:
    """A sleeping engine whose weights are released and never pushed back needs a CPU copy."""
    return bool(enable_sleep) and (tags is None or "weights" in tags)


def common_engine_kwargs(cfg) -> dict[str, Any]:
    """Settings both engines share (the process-global ones among them)."""
    dtype = cfg.model.sglang_dtype
    if dtype not in SGLANG_DTYPES:
        raise ConfigError(f"sglang_dtype must be one of {', '.join(SGLANG_DTYPES)}, "
                          f"got '{dtype}'")
    return dict(dtype=dtype, skip_tokenizer_init=True, enable_return_hidden_states=True,
                trust_remote_code=cfg.model.trust_remote_code, random_seed=cfg.train.seed,
                enable_memory_saver=bool(cfg.train.enable_sleep), log_level="error")


def check_shared_settings(kwargs: Sequence[dict[str, Any]]) -> None:
    """ConfigError when engines of one process differ in a :data:`PROCESS_GLOBAL_KEYS`."""
    for key in PROCESS_GLOBAL_KEYS:
        values = {repr(k.get(key)) for k in kwargs}
        if len(values) > 1:
            raise ConfigError(f"SGLang engines in one process share their '{key}' setting "
                              f"(process-global), but got {sorted(values)}")


def with_flush_flags(buckets: Iterable[list[tuple[str, torch.Tensor]]],
                     ) -> Iterable[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """``(bucket, flush)`` pairs: ``flush`` is True only for the last bucket."""
    previous = None
    for bucket in buckets:
        if previous is not None:
            yield previous, False
        previous = bucket
    if previous is not None:
        yield previous, True


class SGLangEngine(EngineLifecycle):
    """An in-process ``sglang.Engine`` held as ``self.engine`` with ``self.offload_tags``
    naming what :meth:`sleep` releases (None: every tag)."""

    engine: Any = None
    offload_tags: list[str] | None = None
    dtype: str = "bfloat16"  # the engine's ``dtype`` setting

    @property
    def compute_dtype(self) -> torch.dtype:
        """The torch dtype pushed weights are cast to (``auto``: bf16)."""
        return {"float16": torch.float16, "float32": torch.float32}.get(self.dtype,
                                                                         torch.bfloat16)

    def _release(self) -> None:
        self.engine.release_memory_occupation(tags=self.offload_tags)

    def _resume(self) -> None:
        self.engine.resume_memory_occupation(tags=self.offload_tags)

    def _shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     flush_cache: bool = True) -> None:
        """One bucket of ``(HF name, tensor)`` pairs; the engine must be awake."""
        if self.asleep:
            raise RuntimeError("weights pushed into a sleeping SGLang engine (wake it first)")
        self.engine.update_weights_from_tensor(named_tensors=list(named_tensors),
                                               flush_cache=flush_cache)
