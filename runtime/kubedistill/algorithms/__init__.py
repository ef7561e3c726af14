"""Distillation algorithms: ``ALGORITHMS`` (name -> ``Algorithm`` subclass),
``register_algorithm(name)``, and ``build_algorithm(cfg, teacher_head, student_hidden_size)``.

User algorithms register from a module named in ``$KUBEDISTILL_PLUGINS`` (see
:mod:`kubedistill.losses.registry`).
"""

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.algorithms.dskd import DSKD
from kubedistill.algorithms.registry import ALGORITHMS, build_algorithm, register_algorithm
from kubedistill.algorithms.sft import SFT
from kubedistill.algorithms.simple_ctkd import SimpleCTKD
from kubedistill.algorithms.vanilla_kd import VanillaKD, kd_scale

__all__ = ["ALGORITHMS", "DSKD", "SFT", "Algorithm", "MicroBatch", "SimpleCTKD", "VanillaKD",
           "build_algorithm", "kd_scale", "register_algorithm"]
