"""Name -> object registries for losses and algorithms, with user plugins.

A :class:`Registry` is a ``dict`` that imports the user's plugin modules before any lookup.
Plugins are named, comma-separated, in the environment variable ``KUBEDISTILL_PLUGINS``::

    KUBEDISTILL_PLUGINS=my_losses,my_team.kd_algos kubedistill train -c recipe.yaml \\
        --kd_loss_fn my_loss --kd_algorithm my_algo

Each module is imported once (it must be importable: on ``sys.path`` / installed) and
registers its objects with ``@register_loss("name")`` / ``@register_algorithm("name")`` at
import time. Because the variable travels with the environment, the same plugins load in
every torchrun worker and in every KFP component pod, with no configuration key. The
variable is read again on each lookup, so modules named later are still picked up.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from typing import Any

from kubedistill.errors import ConfigError

PLUGINS_ENV = "KUBEDISTILL_PLUGINS"
_imported: set[str] = set()


def load_plugins() -> list[str]:
    """Import every module named in ``$KUBEDISTILL_PLUGINS`` not imported yet; return them."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    new = [n for n in names if n not in _imported]
    for name in new:
        _imported.add(name)  # before importing: a plugin may look names up while it loads
        try:
            importlib.import_module(name)
        except ImportError as exc:
            _imported.discard(name)
            raise ConfigError(f"{PLUGINS_ENV}: cannot import plugin module '{name}': {exc}"
                              ) from exc
    return new


class Registry(dict):
    """A dict of named objects that loads user plugins before it is read.

    ``kind`` names what it holds ("loss", "algorithm") and ``key`` the config key that
    selects one (``kd_loss_fn``), for error messages.
    """

    def __init__(self, kind: str, key: str, aliases: dict[str, str] | None = None):
        super().__init__()
        self.kind = kind
        self.key = key
        self.aliases = dict(aliases or {})  # long names, used only to suggest the real one

    # reads: plugins first ---------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        load_plugins()
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return super().__contains__(name)

    def __iter__(self):
        load_plugins()
        return super().__iter__()

    def __len__(self) -> int:
        load_plugins()
        return super().__len__()

    def get(self, name: str, default: Any = None) -> Any:
        load_plugins()
        return super().get(name, default)

    def keys(self):
        load_plugins()
        return super().keys()

    def values(self):
        load_plugins()
        return super().values()

    def items(self):
        load_plugins()
        return super().items()

    # API ------------------------------------------------------------------------------
    def lookup(self, name: str) -> Any:
        """The object registered as ``name``; ConfigError naming the closest valid name."""
        load_plugins()
        if super().__contains__(name):
            return super().__getitem__(name)
        valid = sorted(super().keys())
        close = [self.aliases[name]] if name in self.aliases else \
            difflib.get_close_matches(str(name), valid, n=1, cutoff=0.3)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown {self.kind} '{name}' ({self.key}){hint} Valid: {', '.join(valid)}. "
            f"Register your own with @register_{self.kind}(name) in a module named in "
            f"${PLUGINS_ENV}.")

    def register(self, name: str, *, override: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@registry.register("name")``. Re-registering a name needs override."""

        def decorator(obj: Any) -> Any:
            old = super(Registry, self).get(name)
            if old is not None and old is not obj and not override:
                raise ValueError(f"{self.kind} '{name}' is already registered ({old!r}); "
                                 "pass override=True to replace it")
            self[name] = obj
            return obj

        return decorator
