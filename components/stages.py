"""One KFP lightweight Python component per stage.

Each is a thin wrapper: its body imports :mod:`kubedistill.components.steps` (installed in
the runtime image; bodies are serialised by source, so imports live inside them) and calls
the step of the same name. Inputs common to all: ``recipe`` (recipe YAML text),
``overrides`` (JSON object of config keys), ``work_dir`` (storage URI; '' keeps the
recipe's), ``parent_run_id`` (MLflow parent run), ``pinned`` (JSON the pipeline fixes).
Artifacts carry small JSON documents; ``metadata['uri']`` points at the large data.

The image is ``$KUBEDISTILL_IMAGE`` at import time (default :data:`DEFAULT_IMAGE`);
pipelines may override it per task with ``set_container_image``. No packages are installed
at run time: the image holds kfp and kubedistill. (No ``from __future__ import
annotations`` here: KFP reads the annotations as types.)
"""

import os

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

DEFAULT_IMAGE = "kubedistill/runtime:0.1.0"
IMAGE = os.environ.get("KUBEDISTILL_IMAGE", DEFAULT_IMAGE)


def _component(func):
    return dsl.component(base_image=IMAGE, install_kfp_package=False)(func)


@_component
def prepare(recipe: str, overrides: str, work_dir: str, num_shards: int,
            prepared: Output[Dataset], parent_run_id: str = "", pinned: str = "") -> list:
    """Raw data -> prepared dataset; returns (output ``Output``) the shard indexes
    ``[0, num_shards)`` for the teacher fan-out. (A single unnamed return value: kfp.local
    resolves ParallelFor items only from an output called ``Output``.)"""
    from kubedistill.components import steps

    return steps.prepare(prepared, num_shards, recipe=recipe, overrides=overrides,
                         work_dir=work_dir, parent_run_id=parent_run_id, pinned=pinned)


@_component
def cache_teacher(recipe: str, overrides: str, work_dir: str, prepared: Input[Dataset],
                  shard_index: int, num_shards: int, shard: Output[Artifact],
                  parent_run_id: str = "", pinned: str = ""):
    """Teacher hidden states for shard ``shard_index`` of ``num_shards``."""
    from kubedistill.components import steps

    steps.cache_teacher(shard, shard_index, num_shards, recipe=recipe, overrides=overrides,
                        work_dir=work_dir, parent_run_id=parent_run_id, pinned=pinned,
                        upstream={"prepared": prepared})


@_component
def merge_cache(recipe: str, overrides: str, work_dir: str, shards: Input[list[Artifact]],
                num_shards: int, teacher_cache: Output[Dataset], parent_run_id: str = "",
                pinned: str = ""):
    """One teacher-cache manifest over all shards (``shards`` is the collected fan-out)."""
    from kubedistill.components import steps

    steps.merge_cache(teacher_cache, num_shards, recipe=recipe, overrides=overrides,
                      work_dir=work_dir, parent_run_id=parent_run_id, pinned=pinned)


@_component
def train(recipe: str, overrides: str, work_dir: str, prepared: Input[Dataset],
          model: Output[Model], teacher_cache: Input[Dataset] = None,
          parent_run_id: str = "", pinned: str = "") -> str:
    """Train the student; returns the final model URI (HF dir)."""
    from kubedistill.components import steps

    return steps.train(model, recipe=recipe, overrides=overrides, work_dir=work_dir,
                       parent_run_id=parent_run_id, pinned=pinned,
                       upstream={"prepared": prepared, "teacher_cache": teacher_cache})


@_component
def evaluate(recipe: str, overrides: str, work_dir: str, model: Input[Model],
             prepared: Input[Dataset], metrics: Output[Metrics], report: Output[Artifact],
             parent_run_id: str = "", pinned: str = "") -> float:
    """Held-out metrics of the student; returns ``score``."""
    from kubedistill.components import steps

    return steps.evaluate(metrics, report, recipe=recipe, overrides=overrides,
                          work_dir=work_dir, parent_run_id=parent_run_id, pinned=pinned,
                          upstream={"prepared": prepared, "model": model})


@_component
def register(recipe: str, overrides: str, work_dir: str, model: Input[Model],
             metrics: Input[Metrics], registration: Output[Artifact],
             parent_run_id: str = "", pinned: str = "") -> str:
    """MLflow model version with alias 'challenger'. Returns (output ``Output``) the
    decision, 'promote' or 'keep'; the version is in ``registration``. (kfp.local evaluates
    ``dsl.If`` only on outputs called ``Output``.)"""
    from kubedistill.components import steps

    decision, _version = steps.register(registration, recipe=recipe, overrides=overrides,
                                        work_dir=work_dir, parent_run_id=parent_run_id,
                                        pinned=pinned, upstream={"model": model})
    return decision


@_component
def promote(recipe: str, overrides: str, work_dir: str, registration: Input[Artifact],
            promotion: Output[Artifact], parent_run_id: str = "", pinned: str = ""):
    """Alias 'champion' -> the challenger when its score is better."""
    from kubedistill.components import steps

    steps.promote(promotion, recipe=recipe, overrides=overrides, work_dir=work_dir,
                  parent_run_id=parent_run_id, pinned=pinned)


@_component
def open_run(recipe: str, overrides: str, work_dir: str, pipeline_run: str = "",
             pinned: str = "") -> str:
    """Open the MLflow parent run of this pipeline run; returns its id."""
    from kubedistill.components import steps

    return steps.open_run(pipeline_run, recipe=recipe, overrides=overrides,
                          work_dir=work_dir, pinned=pinned)


@_component
def close_run(recipe: str, overrides: str, work_dir: str, pipeline_run: str,
              status: dsl.PipelineTaskFinalStatus, pinned: str = "") -> str:
    """Exit task: mark the parent run of ``pipeline_run`` FINISHED/FAILED/KILLED."""
    from kubedistill.components import steps

    return steps.close_run(pipeline_run, status.state, recipe=recipe, overrides=overrides,
                           work_dir=work_dir, pinned=pinned)


ALL = {c.name: c for c in (prepare, cache_teacher, merge_cache, train, evaluate, register,
                           promote, open_run, close_run)}
