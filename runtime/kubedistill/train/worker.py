"""The worker of one rank: picks the trainer for the config and runs it.

:func:`trainer_class` chooses :class:`~kubedistill.train.trainer.Trainer` (off-policy / SFT)
or :class:`~kubedistill.train.on_policy.OnPolicyTrainer` (``rollout_num_engines > 0``); it
lives here, above both, so that neither trainer module imports the other's dependents
(``on_policy`` builds on ``trainer``; ``trainer`` knows nothing of ``on_policy``).
"""

from __future__ import annotations

from kubedistill.config import Config
from kubedistill.tracking.base import NullTracker


def default_tracker_factory():
    """``kubedistill.tracking.make_tracker`` when the tracking module provides it."""
    try:
        from kubedistill.tracking import make_tracker
    except ImportError:
        return None
    return make_tracker


def trainer_class(cfg: Config) -> type:
    """:class:`Trainer` (off-policy / SFT), or the on-policy loop when
    ``rollout_num_engines > 0`` (:mod:`kubedistill.train.on_policy`)."""
    if cfg.rollout.rollout_num_engines > 0:
        from kubedistill.train.on_policy import OnPolicyTrainer

        return OnPolicyTrainer
    from kubedistill.train.trainer import Trainer

    return Trainer


def run_worker(cfg: Config, tracker_factory=None) -> str:
    """One rank of the run (under torchrun, or alone as a world of one)."""
    from kubedistill.train.fsdp import close, init_distributed

    env = init_distributed(cfg.train.device)
    factory = tracker_factory or default_tracker_factory()
    tracker = factory(cfg, "train") if (factory and env.is_main) else NullTracker()
    try:
        out = trainer_class(cfg)(cfg, env, tracker).fit()
    except BaseException:
        tracker.close("FAILED")
        raise
    else:
        tracker.close("FINISHED")
    finally:
        close()
    return out
