"""The teacher's output layer, kept apart from its body so logits can be rebuilt anywhere.

    logits = softcap(scale * (h @ W^T + b))      softcap(x) = c * tanh(x / c)  (if c is set)

``scale`` covers configs that declare a final logit multiplier (``logit_scale``, Cohere) or
divisor (``logits_scaling``, Granite); ``c`` is ``final_logit_softcapping`` (Gemma 2/3). With
them applied, ``TeacherHead.from_model(m).logits(m.model(x).last_hidden_state)`` equals
``m(x).logits``. Saved as ``lm_head.safetensors`` (weight, optional bias) + ``head.json``.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from kubedistill import storage


class TeacherHead(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=True)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=True)
        self.scale = float(scale)
        self.softcap = None if softcap in (None, 0) else float(softcap)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def _weight_key(self) -> tuple:
        """Changes whenever ``weight`` does (another device, storage or in-place update)."""
        w = self.weight
        return w.device, w.data_ptr(), _version(w)

    def select(self, ids: torch.Tensor) -> TeacherHead:
        """The head restricted to the vocabulary ``ids`` (in that order): its logits are the
        columns ``ids`` of :meth:`logits`. Built once per ``ids`` and reused until the weight
        changes (not a submodule: no state, no FSDP wrapping)."""
        key = (self._weight_key(), ids.data_ptr(), _version(ids), tuple(ids.shape))
        if self.__dict__.get("_selected_key") != key:
            idx = ids.to(self.weight.device)
            head = TeacherHead(self.weight.index_select(0, idx),
                               None if self.bias is None else self.bias.index_select(0, idx),
                               self.scale, self.softcap)
            self.__dict__.update(_selected=head, _selected_key=key)
        return self.__dict__["_selected"]

    def weight32(self) -> torch.Tensor:
        """``weight`` in float32; for a bf16/fp16 head the copy is made once and reused until
        the weight changes."""
        if self.weight.dtype == torch.float32:
            return self.weight
        key = self._weight_key()
        if self.__dict__.get("_w32_key") != key:
            self.__dict__.update(_w32=self.weight.to(torch.float32), _w32_key=key)
        return self.__dict__["_w32"]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher logits for hidden states ``[..., d]`` -> ``[..., V]`` in float32."""
        out = hidden.to(torch.float32) @ self.weight32().T
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    forward = logits

    @classmethod
    def from_model(cls, model: nn.Module) -> TeacherHead:
        """The head of a transformers causal LM (tied embeddings included)."""
        head = model.get_output_embeddings()
        return cls(head.weight, getattr(head, "bias", None), *_scale_softcap(model.config))

    @classmethod
    def from_pretrained(cls, model_path: str, trust_remote_code: bool = False) -> TeacherHead:
        """The head of a local HF checkpoint, reading only the head's tensors (the body may
        be far larger than memory; see :mod:`kubedistill.teacher.weights`)."""
        from kubedistill.teacher.weights import load_submodule

        model, head = load_submodule(model_path, lambda m: m.get_output_embeddings(),
                                     trust_remote_code)
        return cls(head.weight, getattr(head, "bias", None), *_scale_softcap(model.config))

    def save(self, uri_dir: str) -> None:
        tensors = {"weight": self.weight.contiguous().cpu()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous().cpu()
        storage.write_bytes_atomic(storage.join(uri_dir, "lm_head.safetensors"),
                                   save_safetensors(tensors))
        storage.write_json_atomic(storage.join(uri_dir, "head.json"),
                                  {"scale": self.scale, "softcap": self.softcap,
                                   "vocab_size": self.vocab_size,
                                   "hidden_size": self.hidden_size})

    @classmethod
    def load(cls, uri_dir: str) -> TeacherHead:
        tensors = load_safetensors(storage.read_bytes(storage.join(uri_dir, "lm_head.safetensors")))
        meta = json.loads(storage.read_bytes(storage.join(uri_dir, "head.json")))
        return cls(tensors["weight"], tensors.get("bias"), meta["scale"], meta["softcap"])


def _version(t: torch.Tensor) -> int:
    """The in-place update counter (inference-mode tensors have none: -1)."""
    return -1 if t.is_inference() else t._version


def _scale_softcap(config) -> tuple[float, float | None]:
    """(scale, softcap) declared by a transformers config (see the module docstring)."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    scale = float(getattr(text_config, "logit_scale", None) or 1.0)
    if getattr(text_config, "logits_scaling", None):
        scale /= float(text_config.logits_scaling)
    return scale, getattr(text_config, "final_logit_softcapping", None)
