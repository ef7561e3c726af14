"""The ``hf`` rollout engine: batched transformers ``generate`` on any device.

Prompts are left-padded into one batch (``num_return_sequences = n``, so the result is
prompt-major), sampled with ``temperature`` / ``top_p`` (``temperature == 0``: greedy), and
seeded per call: ``generate(..., seed=s)`` draws from a forked RNG seeded with ``s``, so a
resumed run samples exactly what the uninterrupted run sampled. Sampling log-probs are
``log_softmax`` of the processed scores (after temperature and top-p: the distribution the
token was drawn from). Each continuation is cut after its first stop token
(:func:`kubedistill.rollout.engine.finish`); stop tokens are the model's
``generation_config.eos_token_id`` (end-of-turn for chat models) unless given.

Each prompt is repeated ``n`` times in the batch (prompt-major, what ``num_return_sequences``
would build) rather than asking ``generate`` to expand it: its generic expansion repeats every
input along dim 0, which is wrong for inputs that are not per-row (Qwen2-VL's concatenated
``pixel_values`` / ``image_grid_thw``).

Image-text students (``processor`` set; :meth:`HFRolloutEngine.from_pretrained` loads the
model's own :func:`~kubedistill.vlm.processing.load_processor`): a prompt's stored images are
decoded (:func:`kubedistill.data.images.decode_stored`), turned into that sample's pixels
(``processor.pixels``, equal to what prepare's ``encode`` gave) and collated once per batch
(``processor.collate``: each image once; the repeats of a prompt share its tensors).
``mm_token_type_ids`` (1 on image tokens of real positions) is passed where the model's
forward takes it. Qwen2-VL (M-RoPE, transformers 5.24): ``generate`` then computes the 3-D
positions itself in ``_prepare_position_ids_for_generation`` (``get_rope_index`` over the
left-padded prompt, padding skipped through the attention mask) and caches ``rope_deltas``;
each decoded token gets ``text position + rope_delta``, the same positions
``get_rope_index`` gives over ``prompt + response``, so training on the sample sees the
positions it was sampled under. Idefics3 drops the all-zero padding images of the batch.
The image tokens and their markers (``processor.structure_token_ids``) are input-only: they
are never sampled (``suppress_tokens``, so the sampling log-probs are those of the
distribution without them), since a response holding one has no pixels behind it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from kubedistill.errors import ConfigError
from kubedistill.lifecycle import EngineLifecycle
from kubedistill.rollout.engine import Sample, finish


def stop_token_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config,
                   model.config.get_text_config()):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


class HFRolloutEngine(EngineLifecycle):
    def __init__(self, model: nn.Module, stop_ids: Iterable[int] | None = None,
                 batch_size: int = 64, processor=None):
        self.model = model.eval()
        self.model.config.use_cache = True
        self.stop_ids = set(stop_ids) if stop_ids is not None else stop_token_ids(model)
        pad = model.config.get_text_config().pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.stop_ids, default=0))
        self.batch_size = batch_size  # prompts per generate call
        self.device = next(model.parameters()).device
        self.processor = processor  # an ImageTextProcessor for image-text models, else None
        self.takes_mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu",
                        attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                        dtype: torch.dtype | None = None) -> HFRolloutEngine:
        from kubedistill.models import load_causal_lm
        from kubedistill.vlm.model import is_image_text

        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        processor = None
        if is_image_text(path):
            from kubedistill.vlm.processing import load_processor

            processor = load_processor(path, trust_remote_code=trust_remote_code)
        return cls(load_causal_lm(path, dtype=dtype, device=device,
                                  attn_implementation=attn_implementation,
                                  trust_remote_code=trust_remote_code), processor=processor)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], *, n_samples_per_prompt: int = 1,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, images: Sequence[Sequence[bytes] | None] | None = None,
                 ) -> list[Sample]:
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        if self.processor is None and any(images):
            raise ConfigError("the prompts carry images but the rollout model is not an "
                              "image-text model (its config.json has no vision_config)")
        out: list[Sample] = []
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for lo in range(0, len(prompts), self.batch_size):
                hi = lo + self.batch_size
                out += self._generate(prompts[lo:hi], images[lo:hi], lo,
                                      n_samples_per_prompt, max_new_tokens, temperature, top_p)
        return out

    def vision_inputs(self, ids: torch.Tensor, mask: torch.Tensor, images: list,
                      offset: int) -> dict[str, torch.Tensor]:
        """Pixels (each prompt's images once per row, collated once) and
        ``mm_token_type_ids`` of a batch whose row ``i`` has stored images ``images[i]``."""
        if not any(images):
            return {}
        from kubedistill.data.images import decode_stored

        pixels, cache = [], {}
        for i, blobs in enumerate(images):
            key = id(blobs)
            if key not in cache:  # a prompt's repeats share its tensors
                cache[key] = self.processor.pixels(decode_stored(
                    blobs, where=f"rollout prompt {offset + i}")) if blobs else {}
            pixels.append(cache[key])
        out = dict(self.processor.collate(pixels))
        if self.takes_mm_types:
            out["mm_token_type_ids"] = ((ids == self.processor.image_token_id)
                                        & mask.bool()).int()
        return out

    def _generate(self, prompts, images, offset, n, max_new_tokens, temperature, top_p,
                  ) -> list[Sample]:
        rows = [p for p in prompts for _ in range(n)]  # prompt-major repeats
        row_images = [im for im in images for _ in range(n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):  # left padding: generation continues every row
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        vision = self.vision_inputs(ids, mask, row_images, offset)
        sample = temperature > 0
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) \
            if sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.processor is not None:  # image tokens are input-only (module doc)
            kwargs["suppress_tokens"] = sorted(self.processor.structure_token_ids)
        gen = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            **{k: v.to(self.device) for k, v in vision.items()},
            max_new_tokens=max_new_tokens, min_new_tokens=0,
            eos_token_id=sorted(self.stop_ids) or None, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_scores=True, **kwargs)
        new = gen.sequences[:, width:].cpu()
        scores = torch.stack(gen.scores, dim=1).float()  # [B*n, steps, V] processed
        lp = torch.log_softmax(scores, dim=-1).gather(
            2, gen.sequences[:, width:width + scores.shape[1], None]).squeeze(2).cpu()
        samples = []
        for row in range(new.shape[0]):
            response, reason = finish(new[row].tolist(), self.stop_ids, max_new_tokens)
            p = row // n
            samples.append(Sample(offset + p, [int(t) for t in prompts[p]], response, reason,
                                  lp[row, :len(response)].tolist(),
                                  list(images[p]) if images[p] else None))
        return samples

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     flush_cache: bool = True) -> None:  # no cache to flush
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"rollout engine has no weight named {name!r}")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def _shutdown(self) -> None:  # sleep / wake: nothing to release (EngineLifecycle)
        self.model = None
