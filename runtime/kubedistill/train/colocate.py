"""Colocation of the engines and the student on the same GPUs (``enable_sleep`` on CUDA).

While the rollout and teacher engines run, the student's AdamW moments (DTensor shards
included) wait on the CPU; while the student trains, SGLang engines release their GPU memory
(``sleep``) and take it back before they run again (``wake``); the engines' own state machine
(:class:`kubedistill.lifecycle.EngineLifecycle`) turns a wake of an awake engine, or a sleep of
a sleeping one, into a no-op. Off CUDA, or without ``enable_sleep``, every call is a no-op.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class Colocation:
    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = bool(enabled) and device.type == "cuda"
        self.device = device
        if enabled and not self.enabled:
            log.info("enable_sleep: nothing to release on %s (engines and the student "
                     "share no accelerator memory); it acts on CUDA only", device.type)

    def offload(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            move_optimizer_state(optimizer, torch.device("cpu"))
            torch.cuda.empty_cache()

    def reload(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            move_optimizer_state(optimizer, self.device)

    def sleep(self, engine) -> None:
        if self.enabled and hasattr(engine, "sleep"):
            engine.sleep()

    def wake(self, engine) -> None:
        if self.enabled and hasattr(engine, "wake"):
            engine.wake()


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """AdamW moments (DTensor shards included) to ``device``; ``step`` counters stay."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
