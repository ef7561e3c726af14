"""The vocabulary map between two tokenizers, over normalised token strings.

Every token id of a tokenizer stands for a byte string (:func:`token_bytes`):

- byte-level BPE (GPT-2 family: ``Ġ`` space, ``Ċ`` newline, ...): the bytes its printable
  stand-in characters encode;
- SentencePiece: ``▁`` becomes a space and byte-fallback tokens ``<0xNN>`` the byte ``NN``;
- special / added tokens: their content string (``<|im_end|>``), so sequences of both
  tokenizers can be aligned by text (:mod:`kubedistill.crosstok.align`).

:func:`build_vocab_map` pairs a student id ``s`` with a teacher id ``t`` when

1. both are ordinary tokens with the same byte string, or
2. both are special tokens with the same content, or
3. both are special tokens with the same ROLE (bos, eos, pad, end-of-turn), for the specials
   that rule 2 left unpaired (e.g. ``</s>`` <-> ``<|endoftext|>`` as eos).

The map is one to one (no duplicate pairs): when several ids of one side share a string the
lowest id is kept (byte-fallback and other duplicates lose to it). It is stored as
``vocab_map.safetensors`` with two int64 arrays ``student_ids`` [K] (ascending) and
``teacher_ids`` [K]; :func:`vocab_map_hash` is the sha256 of those arrays.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

VOCAB_MAP_FILE = "vocab_map.safetensors"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
               "</s>", "<eos>")
ROLES = ("bos", "eos", "pad", "eot")


@functools.cache
def byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet: printable stand-in char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in str(backend.decoder)


@dataclass
class TokenTable:
    """``data[i]`` is the byte string of token id ``i``; ``special[i]`` marks special/added
    control tokens; ``roles`` maps a role (bos/eos/pad/eot) to an id."""

    data: list[bytes]
    special: np.ndarray  # [V] bool
    roles: dict[str, int]

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self, ids) -> np.ndarray:
        return np.fromiter((len(self.data[i]) for i in ids), dtype=np.int64, count=len(ids))

    def text(self, ids) -> bytes:
        return b"".join(self.data[i] for i in ids)


def token_table(tokenizer: Any) -> TokenTable:
    """The byte string of every token id of ``tokenizer`` (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    data = [b""] * size
    special = np.zeros(size, dtype=bool)
    byte_level = is_byte_level(tokenizer)
    decoder = byte_decoder()
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special_ids |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    for token, i in vocab.items():
        if i in added or i in special_ids:
            content = getattr(added.get(i), "content", token)
            data[i] = content.encode("utf-8")
            special[i] = i in special_ids
        elif byte_level and all(ch in decoder for ch in token):
            data[i] = bytes(decoder[ch] for ch in token)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            data[i] = bytes([int(token[3:5], 16)])
        else:
            data[i] = token.replace("▁", " ").encode("utf-8")
    return TokenTable(data, special, _roles(tokenizer, vocab))


def _roles(tokenizer: Any, vocab: dict[str, int]) -> dict[str, int]:
    roles = {}
    for role in ("bos", "eos", "pad"):
        i = getattr(tokenizer, f"{role}_token_id", None)
        if i is not None:
            roles[role] = int(i)
    for name in END_OF_TURN:
        if name in vocab:
            roles["eot"] = int(vocab[name])
            break
    return roles


@dataclass
class VocabMap:
    """Paired ids: ``student_ids[k]`` and ``teacher_ids[k]`` stand for the same string."""

    student_ids: torch.Tensor  # [K] long, ascending
    teacher_ids: torch.Tensor  # [K] long

    def __len__(self) -> int:
        return int(self.student_ids.numel())

    def hash(self) -> str:
        return vocab_map_hash(self.student_ids, self.teacher_ids)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({"student_ids": self.student_ids.contiguous(),
                     "teacher_ids": self.teacher_ids.contiguous()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> VocabMap:
        from safetensors.torch import load

        t = load(blob)
        return cls(t["student_ids"].long(), t["teacher_ids"].long())

    def save(self, prepared_path: str) -> str:
        from kubedistill import storage

        storage.write_bytes_atomic(storage.join(prepared_path, VOCAB_MAP_FILE), self.to_bytes())
        return self.hash()

    @classmethod
    def load(cls, prepared_path: str) -> VocabMap:
        from kubedistill import storage

        return cls.from_bytes(storage.read_bytes(storage.join(prepared_path, VOCAB_MAP_FILE)))


def vocab_map_hash(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (student_ids, teacher_ids):
        h.update(np.ascontiguousarray(t.cpu().numpy().astype("<i8")).tobytes())
        h.update(b"\0")
    return h.hexdigest()


def build_vocab_map(student: Any, teacher: Any) -> VocabMap:
    """The one-to-one map between two tokenizers (or :class:`TokenTable` s); see the
    module docstring for the rules."""
    s = student if isinstance(student, TokenTable) else token_table(student)
    t = teacher if isinstance(teacher, TokenTable) else token_table(teacher)
    pairs: dict[int, int] = {}
    used_t: set[int] = set()

    def add(si: int, ti: int) -> None:
        if si not in pairs and ti not in used_t:
            pairs[si] = ti
            used_t.add(ti)

    t_first: dict[tuple[bool, bytes], int] = {}
    for i, b in enumerate(t.data):
        if b and (bool(t.special[i]), b) not in t_first:
            t_first[(bool(t.special[i]), b)] = i
    for i, b in enumerate(s.data):  # ascending ids: the lowest id of a duplicate string wins
        ti = t_first.get((bool(s.special[i]), b)) if b else None
        if ti is not None:
            add(i, ti)
    for role in ROLES:  # specials left unpaired: by role
        si, ti = s.roles.get(role), t.roles.get(role)
        if si is not None and ti is not None and s.special[si] and t.special[ti]:
            add(si, ti)
    order = sorted(pairs)
    return VocabMap(torch.tensor(order, dtype=torch.long),
                    torch.tensor([pairs[i] for i in order], dtype=torch.long))
