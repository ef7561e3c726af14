"""The ``sglang`` teacher engine: an in-process ``sglang.Engine`` doing prefill only (GPU).

Engine settings: ``enable_return_hidden_states=True``, ``disable_radix_cache=True`` (no
prefix reuse across samples, so every state comes from a full prefill),
``skip_tokenizer_init=True``, plus every ``teacher_*`` setting: ``tp_size``, ``ep_size``,
``pp_size``, ``dp_size``, ``mem_fraction_static``, ``quantization``; with
``enable_sleep`` the engine is built with ``enable_memory_saver=True`` and
:meth:`sleep`/:meth:`wake` call ``release_memory_occupation`` / ``resume_memory_occupation``
with ``teacher_offload_tags`` (``all`` = every tag). Only SGLang's public Engine API is used.

Requests send ``input_ids`` (never text, so positions line up with the prepared masks) with
``sampling_params={"max_new_tokens": 0}`` and ``return_hidden_states=True``, at most
``teacher_batch_tokens`` tokens per call (the engine runs without chunked prefill, see
:mod:`kubedistill.teacher.sglang_states`). SGLang 0.5.x returns ``meta_info["hidden_states"]``:
a list whose first item holds the prefill states, ``[prompt_len, d]`` (nested lists), one
later item per generated token; with ``max_new_tokens=0`` exactly one block is accepted.
A sleeping teacher keeps its weights through ``enable_weights_cpu_backup``.

Image-text teachers: a request also sends ``image_data`` (one list per request, None for a
text row): the row's stored images decoded to RGB PIL images
(:func:`~kubedistill.data.images.decode_stored`, transparency already on white, exactly the
pixels the ``hf`` engine and prepare used; SGLang's own loader would drop alpha instead).
SGLang's multimodal processor decodes ``input_ids`` back to text, finds each image's token
run by the family's image-token pattern and expands it again with its processor (read in
``multimodal/processors/base_processor.py``, ``load_mm_data``), so the prompt it runs is ITS
expansion. Every result is therefore checked: ``meta_info["prompt_tokens"]`` must equal the
prepared length, else :class:`~kubedistill.vlm.inputs.ExpansionMismatch` naming the sample
(never a truncation), and the states block must have exactly that many rows.

Post-norm or not: for the Llama/Qwen/Mistral/Gemma families SGLang's model ``forward``
applies the final norm before its ``LogitsProcessor``, whose input is what it stores, and
SGLang's own test compares it with transformers' ``hidden_states[-1]`` (post-norm). But the
``LogitsProcessor`` prefers a model's ``hidden_states_before_norm`` when one is passed, which
some models (MTP/draft heads) do. So this engine **checks on start-up**: it runs one probe with
``return_logprob=True, logprob_start_len=0`` and compares SGLang's own input-token log-probs
with ``log_softmax(lm_head(h))`` built from the stored states; if they agree the states are
used as they are, if they agree only after the teacher's final norm (loaded from the
checkpoint, :mod:`kubedistill.teacher.weights`) that norm is applied here, otherwise it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kubedistill.config import Config
from kubedistill.errors import KubedistillError
from kubedistill.sglang_engine import (
    SGLangEngine,
    common_engine_kwargs,
    needs_weights_backup,
    offload_tags,
)
from kubedistill.teacher.head import TeacherHead
from kubedistill.teacher.sglang_states import budget_groups, prefill_states

log = logging.getLogger(__name__)
_PROBE = list(range(100, 164))


def engine_kwargs(cfg: Config, model_path: str) -> dict[str, Any]:
    """The teacher's ``sglang.Engine`` settings (see the module docstring and
    :mod:`kubedistill.sglang_engine` for why each one is there)."""
    kd = cfg.kd
    tags = offload_tags(kd.teacher_offload_tags)
    kwargs: dict[str, Any] = dict(
        common_engine_kwargs(cfg),
        model_path=model_path, tp_size=kd.teacher_tp_size, ep_size=kd.teacher_ep_size,
        pp_size=kd.teacher_pp_size, dp_size=kd.teacher_dp_size,
        mem_fraction_static=kd.teacher_mem_fraction_static, disable_radix_cache=True,
        # no chunked prefill: a chunked request gets the wrong hidden-state rows
        # (teacher/sglang_states.py); calls are split to this budget instead
        chunked_prefill_size=-1, max_prefill_tokens=int(cfg.cache.teacher_batch_tokens))
    if needs_weights_backup(cfg.train.enable_sleep, tags):
        kwargs["enable_weights_cpu_backup"] = True  # released weights come back (>= 0.5.3)
    if kd.teacher_quantization:
        kwargs["quantization"] = kd.teacher_quantization
    return kwargs


def probe_tolerance(dtype: str) -> float:
    """Max |log-prob difference| the start-up probe accepts.

    The engine computes its log-probs from bf16 (fp16) logits: rounding a logit of magnitude
    16-32 to bf16 moves it by up to 2^-4 = 0.0625, and a log-softmax mixes the target's error
    with the normaliser's, so a GOOD bf16 engine can differ from our float32 rebuild by
    ~0.125; 0.05 would refuse it. The wrong choice (pre- vs post-norm states) is off by
    nats, so 0.25 still separates the two cases. float32 engines get 0.01.
    """
    return 0.01 if dtype == "float32" else 0.25


class SGLangTeacherEngine(SGLangEngine):
    def __init__(self, engine: Any, hidden_size: int, head: TeacherHead,
                 final_norm: torch.nn.Module | None, offload_tags: list[str] | None):
        self.engine = engine
        self.hidden_size = hidden_size
        self.head = head
        self.final_norm = final_norm
        self.apply_norm = False
        self.offload_tags = offload_tags
        self.batch_tokens = 16384  # token budget of one generate call

    @classmethod
    def from_config(cls, cfg: Config, model_path: str) -> SGLangTeacherEngine:
        import sglang  # lazy: GPU images only

        from kubedistill.teacher.weights import load_submodule
        from kubedistill.vlm.model import language_model

        model, norm = load_submodule(model_path, lambda m: language_model(m).norm,
                                     cfg.model.trust_remote_code)
        hidden_size = int(model.config.get_text_config().hidden_size)
        head = TeacherHead.from_pretrained(model_path, cfg.model.trust_remote_code)
        kwargs = engine_kwargs(cfg, model_path)
        engine = sglang.Engine(**kwargs)
        self = cls(engine, hidden_size, head, norm.float().eval(),
                   offload_tags(cfg.kd.teacher_offload_tags))
        self.dtype, self.batch_tokens = kwargs["dtype"], kwargs["max_prefill_tokens"]
        self.check_post_norm()
        return self

    def _generate(self, sequences: Sequence[Sequence[int]], **extra: Any) -> list[dict]:
        out = self.engine.generate(input_ids=[list(map(int, s)) for s in sequences],
                                   sampling_params={"max_new_tokens": 0, "temperature": 0.0},
                                   return_hidden_states=True, **extra)
        return out if isinstance(out, list) else [out]

    @torch.inference_mode()
    def check_post_norm(self) -> None:
        """Decide whether returned states need the final norm (see the module docstring)."""
        out = self._generate([_PROBE], return_logprob=True, logprob_start_len=0)[0]
        states = prefill_states(out["meta_info"]["hidden_states"], len(_PROBE),
                                self.hidden_size)
        # one entry (logprob, token id, text) per input token; the first has no logprob
        entries = out["meta_info"]["input_token_logprobs"][-(len(_PROBE) - 1):]
        ref = torch.tensor([float(t[0]) for t in entries])
        targets = torch.tensor(_PROBE[1:])

        def error(h: torch.Tensor) -> float:
            lp = torch.log_softmax(self.head.logits(h[:-1]), dim=-1)
            return float((lp.gather(1, targets[:, None])[:, 0] - ref).abs().max())

        as_is, normed = error(states), error(self.final_norm(states))
        log.info("sglang hidden-state probe: max |dlogprob| as returned %.4f, after the final "
                 "norm %.4f", as_is, normed)
        tolerance = probe_tolerance(self.dtype)
        if as_is <= tolerance and as_is <= normed:
            return
        if normed <= tolerance:
            log.warning("sglang returns pre-norm hidden states; applying the teacher's final "
                        "norm here")
            self.apply_norm = True
            return
        raise KubedistillError(f"sglang hidden states do not reproduce its own log-probs "
                               f"(max error {min(as_is, normed):.3f}); refusing to cache them")

    @torch.inference_mode()
    def final_states(self, sequences: Sequence[Sequence[int]],
                     positions: Sequence[Sequence[int]],
                     images: Sequence[Sequence[bytes] | None] | None = None,
                     where: Sequence[str] | None = None) -> list[torch.Tensor]:
        result = [torch.zeros(len(p), self.hidden_size) for p in positions]
        todo = [i for i, p in enumerate(positions) if len(p)]
        if not todo:
            return result
        outputs: list[dict] = []
        for group in budget_groups([len(sequences[i]) for i in todo], self.batch_tokens):
            rows = [todo[g] for g in group]
            outputs += self._generate([sequences[r] for r in rows],
                                      **image_request(images, rows, where))
        for i, out in zip(todo, outputs, strict=True):
            check_prompt_length(out["meta_info"], len(sequences[i]), _name(where, i))
            states = prefill_states(out["meta_info"]["hidden_states"], len(sequences[i]),
                                    self.hidden_size)
            states = states[torch.as_tensor(positions[i], dtype=torch.long)]
            result[i] = self.final_norm(states) if self.apply_norm else states
        return result

    @torch.inference_mode()
    def final_topk(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                   k: int, images: Sequence[Sequence[bytes] | None] | None = None,
                   where: Sequence[str] | None = None,
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Top-k straight from SGLang (``teacher_signal: topk``): no hidden states leave
        the engine; see :func:`topk_from_meta_info`."""
        todo = [i for i, p in enumerate(positions) if len(p)]
        result = [(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long))] * len(positions)
        if todo:
            outputs = self.engine.generate(
                input_ids=[list(map(int, sequences[i])) for i in todo],
                sampling_params={"max_new_tokens": 0, "temperature": 0.0},
                return_logprob=True, top_logprobs_num=k, logprob_start_len=0,
                **image_request(images, todo, where))
            outputs = outputs if isinstance(outputs, list) else [outputs]
            for i, out in zip(todo, outputs, strict=True):
                check_prompt_length(out["meta_info"], len(sequences[i]), _name(where, i))
                result[i] = topk_from_meta_info(out["meta_info"], positions[i], k,
                                                where=f"sglang {_name(where, i)}")
        return result


def image_request(images: Sequence[Sequence[bytes] | None] | None, rows: Sequence[int],
                  where: Sequence[str] | None) -> dict[str, Any]:
    """``{"image_data": [...]}`` for the requests ``rows`` (RGB PIL images per request,
    None for a text row), or ``{}`` when none of them has an image."""
    if images is None or not any(images[r] for r in rows):
        return {}
    from kubedistill.data.images import decode_stored

    return {"image_data": [decode_stored(images[r], where=_name(where, r)) if images[r]
                           else None for r in rows]}


def check_prompt_length(meta_info: dict, prepared: int, where: str) -> None:
    """SGLang ran ``meta_info["prompt_tokens"]`` tokens (its own image expansion); anything
    but the prepared length is an :class:`~kubedistill.vlm.inputs.ExpansionMismatch`."""
    ran = meta_info.get("prompt_tokens")
    if ran is not None and int(ran) != int(prepared):
        from kubedistill.vlm.inputs import ExpansionMismatch

        raise ExpansionMismatch(f"{where}: sglang expanded the prompt to {ran} tokens, the "
                                f"prepared row has {prepared}; its processor expands images "
                                "differently from prepare's (re-run prepare with this "
                                "teacher's processor)")


def _name(where: Sequence[str] | None, i: int) -> str:
    return f"sample {where[i]}" if where is not None else f"sample {i}"


def topk_from_meta_info(meta_info: dict, positions: Sequence[int], k: int, where: str = "sglang"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's ``meta_info["input_top_logprobs"]`` (``logprob_start_len=0``: entry i, a list
    of ``(logprob, token_id, text)``, is for token i) -> the cache's top-k columns
    ``(logprobs [n, k] float32, ids [n, k])`` at loss ``positions`` (position p: entry p+1).
    The same conversion reads SGLang-shaped files in ``import-logprobs``."""
    import numpy as np

    from kubedistill.teacher.logprobs import select_topk, sglang_entries

    return select_topk(sglang_entries(meta_info["input_top_logprobs"]),
                       np.asarray(positions, dtype=np.int64), k, where)

