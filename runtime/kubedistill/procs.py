"""Process lifetime: every process a stage starts dies with the process that started it.

Linux's ``prctl(PR_SET_PDEATHSIG, sig)`` asks the kernel to send ``sig`` to a process when
its parent thread exits, however the parent dies (SIGKILL and OOM kills included). Two uses:

- :data:`die_with_parent`: a ``preexec_fn`` for ``subprocess`` (resolved here, in the parent:
  between fork and exec the child must not import or take locks);
- :func:`bind_to_parent`: called first thing in a child we do not spawn ourselves (torchrun's
  workers, which torchrun starts in a session of their own so a process-group kill misses
  them; data-prep pool workers, stage processes under ``kfp.local``). A child that starts
  slowly may find its parent dead already (the flag only covers deaths after it is set), so
  it checks its parent: the pid it was given, or what its parent runs.

SGLang's own scheduler and detokenizer processes set the same flag on themselves (SGLang's
``kill_itself_when_parent_died``), so a teacher or rollout engine dies with its stage too.
Elsewhere than Linux these are no-ops.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _prctl()


def _setter(sig: int) -> Callable[[], None] | None:
    if _PRCTL is None:
        return None
    prctl, number = _PRCTL, int(sig)
    return lambda: prctl(PR_SET_PDEATHSIG, number)


#: ``preexec_fn`` for a child that must get SIGTERM when the launching process dies (torchrun
#: forwards SIGTERM to its workers, and they also bind themselves, see bind_to_parent).
die_with_parent = _setter(signal.SIGTERM)


def bind_to_parent(sig: int = signal.SIGKILL, parent: int | None = None,
                   parent_runs: tuple[str, ...] = ()) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, and exit now if
    the parent is already gone: when it is not ``parent`` (a pid the parent passed down),
    or when its command line contains none of ``parent_runs`` (e.g. torchrun's names: a
    worker whose torchrun died before this call is a child of init or a subreaper)."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, int(sig))
    ppid = os.getppid()
    orphaned = (parent is not None and ppid != parent) or (
        parent_runs and not any(name in process_cmdline(ppid) for name in parent_runs))
    if orphaned:
        os._exit(128 + int(sig))


def process_cmdline(pid: int) -> str:
    """The command line of ``pid`` from /proc (words joined by spaces; "" when gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
