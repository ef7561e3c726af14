"""Normalise one raw row into a :class:`Conversation` (roles system/user/assistant).

Accepted shapes (``input_key`` / ``output_key`` from the data config):

=====================  ==================================================================
OpenAI messages        ``row[input_key]`` = ``[{"role", "content"}, ...]`` (content may be
                       a list of ``{"type": "text", "text"}`` parts)
ShareGPT               a list of ``{"from", "value"}`` with from human/gpt/system; used also
                       when ``input_key`` is absent and the row has ``conversations``
Alpaca                 ``instruction`` (+ optional ``input``) and ``output``; used when
                       ``input_key`` is absent and the row has both
prompt / response      ``row[input_key]`` a string (or a messages list ending with a user
                       turn) and ``row[output_key]`` the assistant reply
plain text             ``row[input_key]`` a string and ``output_key`` None: a language-
                       modelling sample, every token a target (no chat template); not
                       when ``input_key`` is a chat column (``messages``, ...): a string
                       there is a bad row
=====================  ==================================================================

``input_template`` (KDFlow's, used only with ``apply_chat_template: false``) formats a
plain-string prompt: ``input_template.format(prompt)``.

A messages list is valid when an optional system turn comes first, then user and assistant
turns alternate starting with user, and it ends with a non-empty assistant turn. With
``output_key`` set, the output is appended as the final assistant turn. ``label_key`` is kept
as a string. ``teacher_input_key`` names a different prompt for the teacher (a string or a
messages list without the reply); the teacher gets the same final assistant reply, so it
needs rows with a single assistant turn.

With ``images=True`` (image-text runs, :mod:`kubedistill.data.image_rows`) a content-part
list that holds image parts (``{"type": "image"}`` / ``"image_url"``) is kept as a list, text
parts checked, for :func:`kubedistill.data.images.attach_images`; without it such a part is a
bad row (a text model cannot read it).

Contract: :func:`normalise` raises :class:`RowError` (field + reason) for any row it cannot
use; it never returns a conversation without a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubedistill.config import DataConfig

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}


#: columns that hold a conversation: a string there is a bad row, never plain text
CHAT_KEYS = frozenset({"messages", "conversations", "conversation", "chat"})


def missing_columns(columns: set[str], data: DataConfig) -> list[tuple[str, str]]:
    """``(config key, column)`` for each column the data config needs that ``columns`` (the
    keys of a whole file) lack, following :func:`normalise`'s fallbacks."""
    missing = []
    fallback = "conversations" in columns or {"instruction", "output"} <= columns
    if data.input_key not in columns and not fallback:
        missing.append(("input_key", data.input_key))
    if data.output_key and data.input_key in columns and data.output_key not in columns:
        missing.append(("output_key", data.output_key))
    for name in ("label_key", "teacher_input_key", "image_key"):
        column = getattr(data, name)
        if column and column not in columns:
            missing.append((name, column))
    return missing


class RowError(Exception):
    """A row that cannot be used: ``field`` names the key, ``reason`` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field '{field}': {reason}")
        self.field = field
        self.reason = reason


@dataclass
class Conversation:
    """A normalised sample. ``messages`` is None for plain text (``text`` set instead)."""

    messages: list[dict[str, str]] | None
    text: str | None = None
    teacher_messages: list[dict[str, str]] | None = None
    label: str | None = None

    @property
    def response(self) -> str:
        """Text of the last assistant turn ("" for plain text)."""
        if not self.messages:
            return ""
        return text_of(next(m["content"] for m in reversed(self.messages)
                            if m["role"] == "assistant"))


_IMAGE_PARTS = ("image", "image_url")


def text_of(content: str | list[dict[str, Any]]) -> str:
    """The text of message content: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def _check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "missing value (null)")
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(field, f"undecodable text (invalid code point at {exc.start})") from exc
    return value


def _content(value: Any, field: str, images: bool = False) -> str | list[dict[str, Any]]:
    if isinstance(value, list):  # OpenAI content parts
        parts, has_image = [], False
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if images and kind in _IMAGE_PARTS:
                parts.append(dict(part))
                has_image = True
                continue
            if kind != "text":
                allowed = "text and image" if images else "text only"
                raise RowError(field, f"unsupported content part '{kind}' ({allowed})")
            parts.append({"type": "text", "text": _check_text(part.get("text"), field)})
        return parts if has_image else text_of(parts)
    return _check_text(value, field)


def parse_messages(value: Any, field: str, images: bool = False) -> list[dict[str, Any]]:
    """A list of OpenAI or ShareGPT turns -> ``[{"role", "content"}]`` (roles mapped);
    ``images``: content with image parts stays a part list (see the module docstring)."""
    if not isinstance(value, list) or not value:
        raise RowError(field, "expected a non-empty list of messages")
    out = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"expected a message object, got {type(turn).__name__}")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif "from" in turn:
            role, content = turn.get("from"), turn.get("value")
        else:
            raise RowError(where, "message has neither 'role' nor 'from'")
        mapped = _ROLES.get(str(role).lower())
        if mapped is None:
            raise RowError(where, f"unsupported role '{role}' (system/user/assistant)")
        out.append({"role": mapped, "content": _content(content, where, images)})
    return out


def check_order(messages: list[dict[str, str]], field: str, *, final: str) -> None:
    """System first (optional), then user/assistant alternating from user; ends on ``final``."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError(field, f"wrong role order: turn {i + len(messages) - len(body)} is "
                                  f"'{m['role']}', expected '{expected}'")
    if not body or body[-1]["role"] != final:
        raise RowError(field, f"conversation must end with a{'n' if final[0] == 'a' else ''} "
                              f"{final} turn")
    for m in body:
        if m["role"] == "assistant" and not text_of(m["content"]).strip():
            raise RowError(field, "empty response")


def _prompt(value: Any, field: str, images: bool = False) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return [{"role": "user", "content": _check_text(value, field)}]
    messages = parse_messages(value, field, images)
    check_order(messages, field, final="user")
    return messages


def normalise(row: dict[str, Any], data: DataConfig, images: bool = False) -> Conversation:
    """One raw row -> a :class:`Conversation` (see the module docstring)."""
    key, out_key = data.input_key, data.output_key
    if key not in row:
        if "conversations" in row:
            key, out_key = "conversations", None
        elif "instruction" in row and "output" in row:
            key, out_key = "instruction", "output"
        else:
            raise RowError(key, "missing key")
    value = row[key]
    if key == "instruction" and row.get("input"):  # Alpaca: instruction + input
        value = f"{_check_text(value, key)}\n\n{_check_text(row['input'], 'input')}"
    if out_key is None and not isinstance(value, list):
        if key in CHAT_KEYS:
            raise RowError(key, f"expected a list of messages, got {type(value).__name__} "
                                "(for plain text name its column in input_key, e.g. 'text')")
        conv = Conversation(messages=None, text=_templated(_check_text(value, key), data))
        if not conv.text.strip():
            raise RowError(key, "empty text")
    else:
        if out_key is None:
            messages = parse_messages(value, key, images)
        else:
            if out_key not in row:
                raise RowError(out_key, "missing key")
            messages = _prompt(value, key, images)
            if not isinstance(value, list):
                messages[-1]["content"] = _templated(messages[-1]["content"], data)
            reply = row[out_key]
            if isinstance(reply, list):
                messages += parse_messages(reply, out_key, images)
            else:
                messages.append({"role": "assistant", "content": _check_text(reply, out_key)})
        check_order(messages, out_key or key, final="assistant")
        conv = Conversation(messages=messages)
    if data.label_key:
        if data.label_key not in row:
            raise RowError(data.label_key, "missing key")
        label = row[data.label_key]
        conv.label = None if label is None else _check_text(str(label), data.label_key)
    if data.teacher_input_key:
        conv.teacher_messages = _teacher_messages(row, data.teacher_input_key, conv)
    return conv


def _templated(prompt: str, data: DataConfig) -> str:
    """KDFlow's ``input_template``: without a chat template, a plain-string prompt becomes
    ``input_template.format(prompt)``."""
    if data.input_template and not data.apply_chat_template:
        return data.input_template.format(prompt)
    return prompt


def _teacher_messages(row: dict[str, Any], key: str, conv: Conversation):
    if key not in row:
        raise RowError(key, "missing key")
    if conv.messages is None:
        raise RowError(key, "teacher_input_key needs chat rows, not plain text")
    if sum(m["role"] == "assistant" for m in conv.messages) != 1:
        raise RowError(key, "teacher_input_key needs rows with a single assistant turn")
    return _prompt(row[key], key) + [{"role": "assistant", "content": conv.response}]
