"""The KFP pipelines: off_policy_kd, on_policy_kd, sft.

``build(name, target)`` returns a pipeline function (a ``GraphComponent``) whose tasks carry
``target``'s Kubernetes settings. Every pipeline takes the same parameters, mirroring a
recipe: ``recipe`` (YAML text), ``overrides`` (JSON object of config keys), ``work_dir``
(storage URI of this run; '' keeps the recipe's) and ``num_shards`` (teacher fan-out;
ignored by pipelines without a teacher cache).

Shape (all inside an ExitHandler whose exit task closes the MLflow parent run, with the
pipeline's final state, whatever happens):

    open-run -> prepare -> ParallelFor(shard): cache-teacher -> merge-cache(Collected)
             -> train -> evaluate -> register -> If(decision == 'promote'): promote

on_policy_kd and sft drop the teacher cache (train rolls out / trains on references);
sft pins ``kd_algorithm: sft``.
"""


import json
from collections.abc import Callable

from kfp import dsl

from kubedistill.components import stages as c
from kubedistill.pipelines.targets import Target, apply

PIPELINES = ("off_policy_kd", "on_policy_kd", "sft")
PINNED = {"off_policy_kd": {}, "on_policy_kd": {}, "sft": {"kd_algorithm": "sft"}}
DESCRIPTIONS = {
    "off_policy_kd": "Off-policy KD from a cached teacher: prepare -> cache-teacher (fan-out) "
                     "-> merge-cache -> train -> evaluate -> register -> promote",
    "on_policy_kd": "On-policy KD with a live teacher: prepare -> train -> evaluate -> "
                    "register -> promote",
    "sft": "Black-box SFT on reference answers: prepare -> train -> evaluate -> register "
           "-> promote",
}


def _stage_tail(common: dict, prep, model_task, target: Target) -> None:
    """evaluate -> register -> If(promote): promote, shared by all pipelines."""
    ev = apply(c.evaluate(**common, model=model_task.outputs["model"],
                          prepared=prep.outputs["prepared"]), "evaluate", target)
    reg = apply(c.register(**common, model=model_task.outputs["model"],
                           metrics=ev.outputs["metrics"]), "register", target)
    with dsl.If(reg.outputs["Output"] == "promote", name="score-beats-champion"):
        apply(c.promote(**common, registration=reg.outputs["registration"]), "promote",
              target)


def build(name: str, target: Target) -> Callable:
    """The pipeline ``name`` (one of :data:`PIPELINES`) for ``target``."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline '{name}'; choose one of {', '.join(PIPELINES)}")
    pinned = json.dumps(PINNED[name])
    with_cache = name == "off_policy_kd"

    @dsl.pipeline(name=name.replace("_", "-"), description=DESCRIPTIONS[name])
    def pipeline(recipe: str, overrides: str = "{}", work_dir: str = "",
                 num_shards: int = 1):
        base = dict(recipe=recipe, overrides=overrides, work_dir=work_dir, pinned=pinned)
        # The exit task may depend on no task, so it finds the parent run by the
        # pipeline-run tag that open-run sets.
        exit_task = apply(c.close_run(**base, pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                          "close-run", target)
        exit_task.set_caching_options(False)
        with dsl.ExitHandler(exit_task, name="mlflow-parent-run"):
            run = apply(c.open_run(**base, pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                        "open-run", target)
            run.set_caching_options(False)
            common = dict(base, parent_run_id=run.output)
            prep = apply(c.prepare(**common, num_shards=num_shards), "prepare", target)
            if with_cache:
                with dsl.ParallelFor(prep.outputs["Output"], name="teacher-shards",
                                     ) as shard_index:
                    shard = apply(c.cache_teacher(**common, prepared=prep.outputs["prepared"],
                                                  shard_index=shard_index,
                                                  num_shards=num_shards),
                                  "cache-teacher", target)
                merged = apply(c.merge_cache(**common, num_shards=num_shards,
                                             shards=dsl.Collected(shard.outputs["shard"])),
                               "merge-cache", target)
                trained = c.train(**common, prepared=prep.outputs["prepared"],
                                  teacher_cache=merged.outputs["teacher_cache"])
            else:
                trained = c.train(**common, prepared=prep.outputs["prepared"])
            apply(trained, "train", target)
            _stage_tail(common, prep, trained, target)

    return pipeline
