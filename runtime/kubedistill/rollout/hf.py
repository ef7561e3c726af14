"""The ``hf`` rollout engine: batched transformers ``generate`` on any device.

Prompts are left-padded into one batch (``num_return_sequences = n``, so the result is
prompt-major), sampled with ``temperature`` / ``top_p`` (``temperature == 0``: greedy), and
seeded per call: ``generate(..., seed=s)`` draws from a forked RNG seeded with ``s``, so a
resumed run samples exactly what the uninterrupted run sampled. Sampling log-probs are
``log_softmax`` of the processed scores (after temperature and top-p: the distribution the
token was drawn from). Each continuation is cut after its first stop token
(:func:`kubedistill.rollout.engine.finish`); stop tokens are the model's
``generation_config.eos_token_id`` (end-of-turn for chat models) unless given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from kubedistill.lifecycle import EngineLifecycle
from kubedistill.rollout.engine import Sample, finish


def stop_token_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


class HFRolloutEngine(EngineLifecycle):
    def __init__(self, model: nn.Module, stop_ids: Iterable[int] | None = None,
                 batch_size: int = 64):
        self.model = model.eval()
        self.model.config.use_cache = True
        self.stop_ids = set(stop_ids) if stop_ids is not None else stop_token_ids(model)
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None
                          else min(self.stop_ids, default=0))
        self.batch_size = batch_size  # prompts per generate call
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu",
                        attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                        dtype: torch.dtype | None = None) -> HFRolloutEngine:
        from kubedistill.models import load_causal_lm

        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        return cls(load_causal_lm(path, dtype=dtype, device=device,
                                  attn_implementation=attn_implementation,
                                  trust_remote_code=trust_remote_code))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], *, n_samples_per_prompt: int = 1,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0) -> list[Sample]:
        out: list[Sample] = []
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for lo in range(0, len(prompts), self.batch_size):
                out += self._generate(prompts[lo:lo + self.batch_size], lo,
                                      n_samples_per_prompt, max_new_tokens, temperature, top_p)
        return out

    def _generate(self, prompts, offset, n, max_new_tokens, temperature, top_p) -> list[Sample]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues every row
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        sample = temperature > 0
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) \
            if sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        gen = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens, min_new_tokens=0, num_return_sequences=n,
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
                                  lp[row, :len(response)].tolist()))
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
