"""Chat templates and loss masks: a conversation -> (input_ids, loss_mask, prompt_len).

Targets (``loss_mask == 1``) are exactly the tokens of the LAST assistant turn's content plus
the end-of-turn token the template puts right after it (ChatML: ``<|im_end|>``; Llama 3:
``<|eot_id|>``; Gemma: ``<end_of_turn>``) -- the first special token that follows the
content, if any. This is KDFlow's target: the rendered text after the prompt
``messages[:-1]`` + generation prompt, right-stripped (so the end-of-turn token is in, the
newline after it is not), without an empty ``<think>`` block. With ``all_assistant_turns``
(config ``train_all_assistant_turns``, kubedistill's) every assistant turn is a target the
same way. Not targets: system/user turns, earlier assistant turns (by default), the
assistant header (``<|im_start|>assistant\\n``), any text the template inserts before the
content (e.g. an empty ``<think></think>`` block), and the newline after the end-of-turn
token. KDFlow also appends ``" " + eos`` to a response that does not end with the eos token
(a template whose end-of-turn token is not the eos); that trains a space and an eos the
template never renders, and is not reproduced: the end-of-turn token ends the target.

How: the whole conversation is rendered once to text. Each assistant content is located in
that text at or after the end of the rendered *prefix* ``messages[:i]`` with
``add_generation_prompt=True`` (when the full render starts with that prefix; otherwise just
after the previous assistant turn), which gives character spans. The text is tokenized once
(``add_special_tokens=False``, as ``apply_chat_template`` does) and a token is a target iff
its start offset lies inside a span. Tokenizers without offsets (slow ones) tokenize the
spans and the text between them separately and concatenate.

Without a chat template (``apply_chat_template: false`` or a tokenizer that has none) turns
are concatenated: ``[bos] content "\\n" ... assistant_content eos ...`` -- each non-assistant
turn is followed by a newline, each assistant turn by the eos token (a target: the last
turn's, or every turn's with ``all_assistant_turns``). Plain text
(language modelling) is ``[bos] text eos`` with every token but the first a target.

Always ``loss_mask[0] == 0`` and ``prompt_len`` is the index of the first target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubedistill.data.chat import Conversation, RowError


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int


def template_hash(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (None when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when the tokenizer encodes text with special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == \
        tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == \
        tokenizer.eos_token_id
    return bool(bos), bool(eos)


class ChatEncoder:
    """Encodes conversations for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, apply_chat_template: bool = True,
                 enable_thinking: bool = False, all_assistant_turns: bool = False):
        self.tok = tokenizer
        self.all_assistant_turns = all_assistant_turns
        template = getattr(tokenizer, "chat_template", None)
        self.use_template = bool(apply_chat_template and template)
        self.template_kwargs: dict[str, Any] = {}
        if self.use_template and "enable_thinking" in str(template):
            self.template_kwargs["enable_thinking"] = enable_thinking
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added))
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)
        self.adds_bos, _ = adds_special(tokenizer)
        self.bos = tokenizer.bos_token if self.adds_bos and tokenizer.bos_token else ""
        self.eos = tokenizer.eos_token or ""
        try:
            tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
            self.has_offsets = True
        except (NotImplementedError, TypeError, ValueError):
            self.has_offsets = False

    # ---- rendering ----------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt,
                                            **self.template_kwargs)

    def _end_of_turn(self, text: str, pos: int) -> int:
        """Length of the end-of-turn marker at ``text[pos:]`` (spaces + special token) or 0."""
        rest = text[pos:]
        stripped = rest.lstrip(" ")
        for special in self.specials:
            if stripped.startswith(special):
                return len(rest) - len(stripped) + len(special)
        return 0

    def template_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of the targets."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], generation_prompt=True)
            lo = max(pos, len(prefix)) if full.startswith(prefix) else pos
            content = message["content"]
            start = full.find(content, lo)
            if start < 0 and content.strip():
                content = content.strip()
                start = full.find(content, lo)
            if start < 0:
                raise RowError("content", f"the chat template does not reproduce assistant "
                                          f"turn {i} verbatim")
            end = start + len(content)
            end += self._end_of_turn(full, end)
            spans.append((start, end))
            pos = end
        return full, self._targets(spans)

    def _targets(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Every assistant span, or the last one only (the default, KDFlow's)."""
        return spans if self.all_assistant_turns else spans[-1:]

    def plain_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """Concatenation without a template (see the module docstring)."""
        text, spans = self.bos, []
        if conv.messages is None:
            spans.append((len(text), len(text) + len(conv.text or "") + len(self.eos)))
            return text + (conv.text or "") + self.eos, spans
        for message in conv.messages:
            if message["role"] == "assistant":
                piece = message["content"] + self.eos
                spans.append((len(text), len(text) + len(piece)))
                text += piece
            else:
                text += message["content"] + "\n"
        return text, self._targets(spans)

    # ---- tokenizing ---------------------------------------------------------------------
    def encode(self, conv: Conversation, messages: list[dict[str, str]] | None = None,
               ) -> Encoded:
        """Tokens and loss mask of ``conv`` (``messages`` overrides its messages)."""
        if messages is not None:
            conv = Conversation(messages=messages, text=conv.text)
        if self.use_template and conv.messages is not None:
            text, spans = self.template_spans(conv.messages)
        else:
            text, spans = self.plain_spans(conv)
        ids, mask = self._tokenize(text, spans)
        if ids:
            mask[0] = 0
        if 1 not in mask:
            raise RowError("content", "no target tokens")
        return Encoded(ids, mask, mask.index(1))

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        if self.has_offsets:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = [0] * len(ids)
            k = 0
            for j, (start, stop) in enumerate(enc["offset_mapping"]):
                while k < len(spans) and start >= spans[k][1]:
                    k += 1
                if k < len(spans) and spans[k][0] <= start < spans[k][1] and stop > start:
                    mask[j] = 1
            return ids, mask
        ids, mask, pos = [], [], 0
        for lo, hi in [*spans, (len(text), len(text))]:
            for piece, flag in ((text[pos:lo], 0), (text[lo:hi], 1)):
                if piece:
                    part = self.tok(piece, add_special_tokens=False)["input_ids"]
                    ids += part
                    mask += [flag] * len(part)
            pos = hi
        return ids, mask
