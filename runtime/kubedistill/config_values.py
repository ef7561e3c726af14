"""How configuration text reads: scalar values, lists, URIs and recipe YAML.

- :func:`coerce_value` turns a YAML or CLI value into a field's declared type, with
  HfArgumentParser's (KDFlow's) boolean spellings (``t/f/y/n``, ``true/false``, ``on/off``),
  KDFlow's tuple syntax ``"(0.9, 0.98)"`` and ``None``/``null`` for optional fields;
- :func:`split_list` (``"a, b,c"`` -> ``["a", "b", "c"]``), :func:`join_uri`;
- :func:`read_recipe` / :func:`parse_yaml`: a recipe file's text and its YAML, with errors
  that name the file, line and column.

No knowledge of which fields exist: that is :mod:`kubedistill.config`.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kubedistill.errors import ConfigError

# HfArgumentParser's (KDFlow's) spellings, plus on/off
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def coerce_value(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML or CLI value into the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce_value(value, args[0], key)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if origin is tuple:  # "0.9,0.98", KDFlow's "(0.9, 0.98)", or a YAML list
            items = (split_list(value.strip().strip("()[]")) if isinstance(value, str)
                     else list(value))
            args = typing.get_args(typ)
            if len(items) != len(args):
                raise ValueError(value)
            return tuple(coerce_value(v, a, key) for v, a in zip(items, args, strict=True))
        if typ is int:
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"config key '{key}': cannot read {value!r} as {type_name(typ)}")


def type_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ))


def plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def split_list(value: str | list | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (lists pass through)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def read_recipe(recipe: str | Path) -> str:
    """The text of a recipe file; ConfigError naming it when it cannot be read."""
    try:
        return Path(recipe).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {recipe}: {exc}") from exc


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` whose syntax errors become one ConfigError line naming
    ``source``, the line and the column (1-based), and what the parser expected."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{what} ({context})" if context else what
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
