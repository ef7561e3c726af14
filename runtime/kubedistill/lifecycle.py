"""The lifecycle shared by every engine (teacher and rollout): awake -> asleep -> awake ...
-> closed, and a guarded shutdown for engines that share one process.

State machine (``EngineLifecycle``)::

    awake --sleep()--> asleep --wake()--> awake
    awake | asleep --close()--> closed

``sleep()`` releases accelerator memory ONLY when the engine is awake and ``wake()`` resumes
it ONLY when the engine is asleep; any other call is a no-op. This is not politeness: SGLang's
scheduler keeps the set of released tags and ``resume_memory_occupation`` removes each tag
from it (``self.offload_tags.remove(tag)`` in ``scheduler_update_weights_mixin.py``), so
resuming an engine that never slept raises KeyError inside the scheduler process, whose
death then takes the trainer down. ``awake()`` is a context manager that wakes a sleeping
engine for the duration of a block (a weight push) and puts it back to sleep after.
Subclasses implement ``_release()`` / ``_resume()`` / ``_shutdown()``; the defaults do
nothing (engines that hold no releasable memory, e.g. the ``hf`` backends).

Shutdown (:func:`close_all`): SGLang's ``Engine.shutdown()`` ends with
``kill_process_tree(os.getpid(), include_parent=False)``, i.e. it kills EVERY child of the
calling process, including the scheduler of another engine living in the same process. That
engine's watchdog then sends SIGQUIT to the process. :func:`close_all` closes all engines of
the process together with SIGQUIT ignored (:func:`sigquit_ignored`) and restores the
previous handler afterwards, once every engine (and so every watchdog) is stopped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

AWAKE, ASLEEP, CLOSED = "awake", "asleep", "closed"


class EngineLifecycle:
    """Mixin holding ``self.state``; see the module docstring for the transitions."""

    state: str = AWAKE

    def sleep(self) -> None:
        if self.state == AWAKE:
            self._release()
            self.state = ASLEEP

    def wake(self) -> None:
        if self.state == ASLEEP:
            self._resume()
            self.state = AWAKE

    def close(self) -> None:
        if self.state != CLOSED:
            self._shutdown()
            self.state = CLOSED

    @property
    def asleep(self) -> bool:
        return self.state == ASLEEP

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Awake inside the block; back to sleep after it if it was asleep before."""
        was_asleep = self.asleep
        self.wake()
        try:
            yield
        finally:
            if was_asleep:
                self.sleep()

    # ---- backend hooks ------------------------------------------------------------------
    def _release(self) -> None:
        pass

    def _resume(self) -> None:
        pass

    def _shutdown(self) -> None:
        pass


@contextlib.contextmanager
def sigquit_ignored() -> Iterator[None]:
    """SIGQUIT ignored inside the block, the previous handler restored after it.

    Outside the main thread (where ``signal.signal`` is refused) the block runs unguarded.
    """
    try:
        previous = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGQUIT, previous)


def close_all(engines: Iterable[object | None]) -> None:
    """Close every engine (None entries skipped) with SIGQUIT ignored; all are closed even
    when one fails, and the first error is raised after the others were closed."""
    error: BaseException | None = None
    with sigquit_ignored():
        for engine in engines:
            if engine is None:
                continue
            try:
                engine.close()
            except BaseException as exc:  # noqa: BLE001 - close the rest, then raise
                log.error("closing %s failed: %s", type(engine).__name__, exc)
                error = error or exc
    if error is not None:
        raise error
