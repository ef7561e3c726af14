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
- **Images.** ``Engine.generate(input_ids=..., image_data=...)`` with ``skip_tokenizer_init``
  decodes the ids to text and splits it at the model's image-token pattern
  (``multimodal/processors/base_processor.py``, ``load_mm_data``): each match takes the next
  image of the request, whose tokens the HF processor then expands. Prepared prompts hold
  the expansion already, so :func:`unexpanded_prompt` turns them back into the ids the chat
  template rendered (one placeholder per image) and proves it by re-encoding them with our
  processor, which must give the prepared ids again; the engine's own expansion is checked
  afterwards against the prepared length (``meta_info["prompt_tokens"]``,
  :func:`check_prompt_tokens`). Images are sent decoded (:func:`images_for_request`: PIL RGB
  with transparency on white, the pixels prepare saw; SGLang's own loader drops alpha).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kubedistill.config_values import split_list
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


def images_for_request(blobs: Sequence[bytes] | None, *, where: str) -> list:
    """A request's ``image_data``: the stored images decoded to RGB as prepare decoded them."""
    from kubedistill.data.images import decode_stored

    return decode_stored(list(blobs or ()), where=where)


def unexpanded_prompt(ids: Sequence[int], images: list, processor, *, where: str,
                      ) -> list[int]:
    """``ids`` (image tokens expanded by ``processor``) with each image's tokens back to the
    placeholder the chat template writes; raises ``ExpansionMismatch`` unless re-encoding the
    result with ``images`` gives ``ids`` exactly. Two layouts are tried:

    - a run of image tokens -> one image token (Qwen2-VL: the template writes
      ``<|vision_start|><|image_pad|><|vision_end|>``, the processor repeats the pad);
    - a run of image/marker tokens -> one image token per image in it (Idefics3: the template
      writes ``<image>``, the processor writes the whole ``<fake_token_around_image>
      <global-img><image>... `` block; images are counted by their global-image tag).
    """
    from kubedistill.vlm.inputs import ExpansionMismatch

    ids = [int(t) for t in ids]
    tok, image_id = processor.tokenizer, processor.image_token_id
    structure = processor.structure_token_ids
    tag = getattr(getattr(processor, "processor", None), "global_image_tag", None)
    tag_id = tok.convert_tokens_to_ids(tag) if tag else None
    candidates = (_collapse(ids, {image_id}, image_id, None),
                  _collapse(ids, structure, image_id, tag_id))
    for candidate in candidates:
        text = tok.decode(candidate, skip_special_tokens=False)
        try:
            if processor.encode(text, images)[0] == ids:
                return candidate
        except ValueError:  # the processor counts placeholders and images itself
            continue
    raise ExpansionMismatch(f"{where}: cannot rebuild the unexpanded prompt of a prepared "
                            f"row with {len(images)} image(s) for SGLang (re-encoding it "
                            "does not give the prepared tokens); re-run prepare with this "
                            "model's processor")


def _collapse(ids: list[int], members: set[int], image_id: int, tag_id: int | None,
              ) -> list[int]:
    """Each maximal run of ``members`` -> ``image_id`` once per image (``tag_id`` count,
    at least one)."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i] not in members:
            out.append(ids[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] in members:
            j += 1
        images = ids[i:j].count(tag_id) if tag_id is not None else 0
        out += [image_id] * max(1, images)
        i = j
    return out


def check_prompt_tokens(out: dict, expected: int, *, where: str) -> None:
    """``ExpansionMismatch`` when SGLang expanded a prompt to another length than prepare."""
    from kubedistill.vlm.inputs import ExpansionMismatch

    got = (out.get("meta_info") or {}).get("prompt_tokens")
    if got is not None and int(got) != expected:
        raise ExpansionMismatch(f"{where}: SGLang expanded the prompt to {got} tokens, the "
                                f"prepared row has {expected}; its image processor differs "
                                "from the one prepare used")


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
