"""The ``sglang`` rollout engine: an in-process ``sglang.Engine`` (GPU), imported lazily.

Engine settings: ``skip_tokenizer_init=True`` (token ids in, token ids out: the trainer
trains on exactly the sampled ids), ``tp_size=rollout_tp_size``,
``mem_fraction_static=rollout_mem_fraction_static``, ``random_seed=seed``, and with
``enable_sleep`` ``enable_memory_saver=True`` so that :meth:`sleep` / :meth:`wake`
(``release_memory_occupation`` / ``resume_memory_occupation``) free the weights and KV cache
while the student trains on the same GPUs. Only SGLang's public Engine API is used.

Requests: ``input_ids`` (each prompt repeated ``n`` times), ``sampling_params`` with
``temperature``, ``top_p``, ``max_new_tokens``, ``sampling_seed`` (a per-sample seed derived
from ``seed``), and ``return_logprob=True``. From each output: ``output_ids``,
``meta_info["finish_reason"]["type"]`` (``"stop"`` / ``"length"``; ``"abort"`` is an error)
and ``meta_info["output_token_logprobs"]`` (``(logprob, token_id, text)`` per token). If the
matched stop token is not among the returned ids it is appended (it was sampled; its
log-prob is then unknown, NaN).

Images (image-text students, ``generate(..., images=...)``): each request also gets
``image_data`` (its prompt's images, decoded as prepare decoded them) and, as ``input_ids``,
the prompt with its image tokens back to one placeholder per image
(:func:`kubedistill.sglang_engine.unexpanded_prompt`, checked by re-encoding); SGLang's
expansion must give the prepared prompt length (``meta_info["prompt_tokens"]``, else
``ExpansionMismatch``). The sample keeps the PREPARED (expanded) prompt ids and the stored
images. A batch without images sends no ``image_data``. The image tokens and their markers
are input-only; SGLang samples the full vocabulary, so a response that holds one is cut
before it (:func:`kubedistill.rollout.engine.cut_before`, a truncation, logged).

Weights: :meth:`load_weights` pushes ``(name, tensor)`` pairs with
``update_weights_from_tensor`` (one call per bucket, ``flush_cache`` only on the last; the
caller buckets, :mod:`kubedistill.rollout.sync`); SGLang's loaders accept HF parameter names.
Settings shared with the teacher engine (dtype, process-global ones) and the sleep / wake
state machine live in :mod:`kubedistill.sglang_engine`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from kubedistill.errors import KubedistillError
from kubedistill.rollout.engine import Sample, cut_before, finish
from kubedistill.sglang_engine import (
    SGLangEngine,
    check_prompt_tokens,
    common_engine_kwargs,
    images_for_request,
    unexpanded_prompt,
)

log = logging.getLogger(__name__)


def engine_kwargs(cfg, model_path: str, index: int = 0) -> dict[str, Any]:
    """Settings of rollout engine ``index`` (engines sit side by side on their own GPUs:
    ``base_gpu_id = index * rollout_tp_size``). No weight backup: the student's weights are
    pushed after every wake."""
    r = cfg.rollout
    return dict(common_engine_kwargs(cfg), model_path=model_path, tp_size=r.rollout_tp_size,
                base_gpu_id=index * r.rollout_tp_size,
                mem_fraction_static=r.rollout_mem_fraction_static)


def parse_output(out: dict, prompt_index: int, prompt: Sequence[int], stop_ids: set[int],
                 max_new_tokens: int) -> Sample:
    """One ``Engine.generate`` output -> :class:`Sample` (see the module docstring)."""
    meta = out.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    ids = [int(t) for t in out.get("output_ids", [])]
    lps = [float(e[0]) if e[0] is not None else math.nan
           for e in meta.get("output_token_logprobs") or []]
    if kind == "stop":
        matched = reason.get("matched") if isinstance(reason, dict) else None
        if isinstance(matched, int) and (not ids or ids[-1] != matched):
            ids.append(matched)
            lps.append(math.nan)
        response = ids
    elif kind == "length":
        response, kind = finish(ids, stop_ids, max_new_tokens)
    else:
        raise KubedistillError(f"sglang rollout ended with finish reason {reason!r}")
    lps = (lps + [math.nan] * len(response))[:len(response)]
    return Sample(prompt_index, [int(t) for t in prompt], response, kind, lps)


class SGLangRolloutEngine(SGLangEngine):
    def __init__(self, engine: Any, stop_ids: set[int], offload_tags: list[str] | None = None,
                 push_device: torch.device | None = None, processor=None):
        self.engine = engine
        self.stop_ids = stop_ids
        self.offload_tags = offload_tags
        self.push_device = push_device  # where sync puts a bucket before pushing it
        self.processor = processor  # image-text students: their ImageTextProcessor

    @classmethod
    def from_config(cls, cfg, model_path: str, index: int = 0) -> SGLangRolloutEngine:
        import sglang  # lazy: GPU images only

        from kubedistill.rollout.hf import stop_token_ids
        from kubedistill.teacher.weights import meta_model
        from kubedistill.vlm.model import is_image_text

        trust = cfg.model.trust_remote_code
        stop = stop_token_ids(meta_model(model_path, trust))
        processor = None
        if is_image_text(model_path):
            from kubedistill.vlm.processing import load_processor

            processor = load_processor(model_path, trust_remote_code=trust)
        kwargs = engine_kwargs(cfg, model_path, index)
        engine = sglang.Engine(**kwargs)
        # buckets on the GPU travel to the engine as CUDA IPC handles, not pickled bytes
        self = cls(engine, stop, push_device=torch.device("cuda", torch.cuda.current_device()),
                   processor=processor)
        self.dtype = kwargs["dtype"]
        return self

    def generate(self, prompts: Sequence[Sequence[int]], *, n_samples_per_prompt: int = 1,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, images: Sequence[Sequence[bytes] | None] | None = None,
                 ) -> list[Sample]:
        n = n_samples_per_prompt
        images = list(images) if images is not None and any(images) else None
        extra: dict[str, Any] = {}
        if images is None:
            inputs = [list(map(int, p)) for p in prompts for _ in range(n)]
        else:
            if self.processor is None:
                raise KubedistillError("the prompts carry images but the rollout model is not "
                                       "an image-text model")
            requests = [self.image_request(p, blobs, i)
                        for i, (p, blobs) in enumerate(zip(prompts, images, strict=True))]
            inputs = [ids for ids, _ in requests for _ in range(n)]
            extra["image_data"] = [data for _, data in requests for _ in range(n)]
        params = [{"temperature": temperature, "top_p": top_p,
                   "max_new_tokens": max_new_tokens, "sampling_seed": seed * 100_003 + i}
                  for i in range(len(inputs))]
        outs = self.engine.generate(input_ids=inputs, sampling_params=params,
                                    return_logprob=True, **extra)
        outs = outs if isinstance(outs, list) else [outs]
        samples, cut = [], 0
        input_only = self.processor.structure_token_ids if self.processor is not None else set()
        for i, o in enumerate(outs):
            p = i // n
            if images is not None:
                check_prompt_tokens(o, len(prompts[p]), where=f"rollout prompt {p}")
            sample = parse_output(o, p, prompts[p], self.stop_ids, max_new_tokens)
            sample.images = list(images[p]) if images is not None and images[p] else None
            cut += cut_before(sample, input_only)
            samples.append(sample)
        if cut:
            log.warning("%d of %d rollout response(s) sampled an image token; cut before it "
                        "(counted as truncated)", cut, len(samples))
        return samples

    def image_request(self, prompt: Sequence[int], blobs: Sequence[bytes] | None,
                      index: int) -> tuple[list[int], list]:
        """``(input_ids, image_data)`` of one prompt (see the module docstring)."""
        where = f"rollout prompt {index}"
        decoded = images_for_request(blobs, where=where)
        if not decoded:
            return [int(t) for t in prompt], []
        return unexpanded_prompt(prompt, decoded, self.processor, where=where), decoded

    def flush(self) -> None:
        self.engine.flush_cache()

