"""The GPU code paths' logic, checked without a GPU (issue 18).

- the engine lifecycle: wake only when asleep, sleep only when awake, against a stand-in
  for SGLang's scheduler that keeps the released tags as SGLang does (resuming a tag that
  was never released is a KeyError there);
- a sleeping teacher keeps its weights (``enable_weights_cpu_backup``); self-distillation
  pushes into a teacher woken for the push; only the last bucket flushes the cache;
- closing engines with SIGQUIT ignored (a real child process sends the signal);
- hidden states: calls split under a token budget, exactly one block of exactly n rows;
- SGLang dtype; flash-attn refused for float32; no import cycle between the protocol
  modules and their implementations.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kubedistill.config import load_config
from kubedistill.errors import ConfigError, KubedistillError
from kubedistill.lifecycle import ASLEEP, AWAKE, CLOSED, EngineLifecycle, close_all, sigquit_ignored
from kubedistill.sglang_engine import SGLangEngine, check_shared_settings, with_flush_flags

RUNTIME = Path(__file__).resolve().parents[1] / "runtime" / "kubedistill"


class SchedulerStandIn:
    """SGLang's scheduler side of an Engine as far as memory tags and weights go
    (``scheduler_update_weights_mixin``): release adds tags, resume REMOVES them (KeyError
    when never released), a weight update while the weights are released is an error."""

    ALL = ("kv_cache", "weights", "cuda_graph")

    def __init__(self):
        self.offload_tags: set[str] = set()
        self.updates: list[tuple[list[str], bool]] = []
        self.shut = False

    def release_memory_occupation(self, tags=None):
        self.offload_tags.update(tags or self.ALL)

    def resume_memory_occupation(self, tags=None):
        for tag in tags or self.ALL:
            self.offload_tags.remove(tag)  # KeyError, as in SGLang

    def update_weights_from_tensor(self, named_tensors, flush_cache=True):
        if "weights" in self.offload_tags:
            raise RuntimeError("illegal memory access: weights are released")
        self.updates.append(([n for n, _ in named_tensors], flush_cache))

    def shutdown(self):
        self.shut = True


def _engine(tags=None) -> SGLangEngine:
    engine = SGLangEngine()
    engine.engine, engine.offload_tags = SchedulerStandIn(), tags
    return engine


# ---- defect 1: the lifecycle state machine ---------------------------------------------------
def test_wake_before_any_sleep_is_a_no_op_and_transitions_are_guarded():
    engine = _engine()
    scheduler = engine.engine
    engine.wake()  # the first sync wakes an engine that never slept
    assert engine.state == AWAKE and scheduler.offload_tags == set()
    engine.sleep()
    engine.sleep()
    assert engine.state == ASLEEP and scheduler.offload_tags == set(SchedulerStandIn.ALL)
    engine.wake()
    engine.wake()
    assert engine.state == AWAKE and scheduler.offload_tags == set()
    engine.close()
    engine.close()
    assert engine.state == CLOSED and scheduler.shut


def test_the_stand_in_fails_like_sglang_without_the_state_machine():
    """What the old code did (resume unconditionally) raises in the scheduler."""
    with pytest.raises(KeyError):
        SchedulerStandIn().resume_memory_occupation(tags=None)


def test_on_policy_colocation_sequence_never_resumes_an_awake_engine():
    from kubedistill.train.colocate import Colocation

    colocation = Colocation(True, torch.device("cuda"))  # sleep/wake touch no CUDA
    rollout, teacher = _engine(), _engine(["kv_cache", "cuda_graph"])
    colocation.wake(rollout)  # fit(): the first sync
    for _ in range(3):  # iterations: rollout, teacher, train, sync
        colocation.sleep(rollout)
        colocation.wake(teacher)  # iteration 1: never slept
        colocation.sleep(teacher)
        colocation.wake(rollout)
    assert rollout.state == AWAKE and teacher.state == ASLEEP
    assert teacher.engine.offload_tags == {"kv_cache", "cuda_graph"}


def test_awake_block_restores_the_previous_state():
    engine = _engine()
    with engine.awake():
        assert engine.state == AWAKE
    assert engine.state == AWAKE
    engine.sleep()
    with engine.awake():
        assert engine.state == AWAKE
    assert engine.state == ASLEEP


def test_hf_engines_share_the_lifecycle(tiny_model_dir):
    from kubedistill.models import load_causal_lm
    from kubedistill.rollout.hf import HFRolloutEngine
    from kubedistill.teacher.hf import HFTeacherEngine

    model = load_causal_lm(tiny_model_dir)
    for engine in (HFRolloutEngine(model), HFTeacherEngine(model)):
        assert isinstance(engine, EngineLifecycle)
        engine.wake()
        engine.sleep()
        assert engine.state == ASLEEP
        engine.close()
        assert engine.state == CLOSED and engine.model is None


# ---- defects 2, 3, flush: weights ------------------------------------------------------------
def test_sleeping_teacher_keeps_its_weights_and_engines_share_process_settings():
    from kubedistill.rollout.sglang import engine_kwargs as rollout_kwargs
    from kubedistill.teacher.sglang import engine_kwargs as teacher_kwargs

    cfg = load_config(None, {"enable_sleep": True, "teacher_batch_tokens": 2048})
    teacher, rollout = teacher_kwargs(cfg, "/t"), rollout_kwargs(cfg, "/s", index=1)
    assert teacher["enable_weights_cpu_backup"] and teacher["enable_memory_saver"]
    assert "enable_weights_cpu_backup" not in rollout  # weights are pushed after each wake
    assert teacher["dtype"] == rollout["dtype"] == "bfloat16"  # defect 6
    assert teacher["chunked_prefill_size"] == -1 and teacher["max_prefill_tokens"] == 2048
    assert rollout["base_gpu_id"] == cfg.rollout.rollout_tp_size
    check_shared_settings([teacher, rollout])
    from kubedistill.rollout.factory import check_colocated_settings

    both = load_config(None, {"teacher_backend": "sglang", "rollout_backend": "sglang"})
    check_colocated_settings(both, "/s", "/t")  # built from the same shared settings
    with pytest.raises(ConfigError, match="'dtype'"):
        check_shared_settings([teacher, dict(rollout, dtype="float16")])
    light = load_config(None, {"enable_sleep": True,
                               "teacher_offload_tags": "kv_cache,cuda_graph"})
    assert "enable_weights_cpu_backup" not in teacher_kwargs(light, "/t")
    awake = teacher_kwargs(load_config(None, {}), "/t")
    assert "enable_weights_cpu_backup" not in awake and not awake["enable_memory_saver"]
    with pytest.raises(ConfigError, match="kv_cahe"):
        teacher_kwargs(load_config(None, {"teacher_offload_tags": "kv_cahe"}), "/t")
    fp32 = load_config(None, {"sglang_dtype": "float32"})
    assert teacher_kwargs(fp32, "/t")["dtype"] == "float32"
    with pytest.raises(ConfigError, match="sglang_dtype"):
        load_config(None, {"sglang_dtype": "fp32"}).validate()


def test_only_the_last_bucket_flushes_the_cache(tiny_model_dir):
    from kubedistill.models import load_causal_lm
    from kubedistill.rollout.hf import HFRolloutEngine
    from kubedistill.rollout.sync import push
    from kubedistill.train.fsdp import DistEnv

    assert list(with_flush_flags(iter([]))) == []
    assert [f for _, f in with_flush_flags([[1], [2], [3]])] == [False, False, True]

    class Recording(HFRolloutEngine):
        flags: list[bool] = []

        def load_weights(self, named_tensors, flush_cache=True):
            self.flags.append(flush_cache)
            super().load_weights(named_tensors, flush_cache)

    source = load_causal_lm(tiny_model_dir)
    engine = Recording(load_causal_lm(tiny_model_dir))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    state = source.state_dict()
    push(state, engine, DistEnv(0, 1, 0, torch.device("cpu")), bucket_bytes=20_000)
    assert len(engine.flags) > 2 and engine.flags == [False] * (len(engine.flags) - 1) + [True]
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_self_distillation_pushes_into_a_woken_teacher_and_lets_it_sleep_again():
    from kubedistill.train.fsdp import DistEnv
    from kubedistill.train.self_distill import SelfDistillTeacher

    kd = load_config(None, {}).kd
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    teacher = _engine()
    teacher.sleep()  # the teacher sleeps between iterations
    sd = SelfDistillTeacher(kd, DistEnv(0, 1, 0, torch.device("cpu")), "/ckpt", head=None,
                            model=model, engine=teacher)
    sd.push()
    names = [n for bucket, _ in teacher.engine.updates for n in bucket]
    assert sorted(names) == sorted(model.state_dict())
    assert [flush for _, flush in teacher.engine.updates][-1] is True
    assert teacher.state == ASLEEP  # back to sleep after the push
    with pytest.raises(RuntimeError, match="sleeping"):
        teacher.load_weights([("w", torch.ones(1))])


# ---- defect 4: closing engines that share a process ----------------------------------------
_SEND_SIGQUIT = "import os, signal; os.kill(os.getppid(), signal.SIGQUIT)"


def test_sigquit_from_a_child_kills_an_unguarded_process():
    """The control: without the guard the same signal ends the process."""
    code = ("import resource, subprocess, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0));"
            f"subprocess.run([sys.executable, '-c', {_SEND_SIGQUIT!r}]); print('alive')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == -signal.SIGQUIT and "alive" not in out.stdout


def test_close_all_survives_a_sigquit_and_restores_the_handler():
    closed: list[str] = []

    class KillsTheOthers:  # like Engine.shutdown: the other engine's watchdog fires
        def close(self):
            subprocess.run([sys.executable, "-c", _SEND_SIGQUIT], check=True, timeout=60)
            closed.append("first")

    class Plain:
        def close(self):
            closed.append("second")

    def marker(signum, frame):  # pragma: no cover - must not be called
        raise AssertionError("SIGQUIT reached the handler")

    previous = signal.signal(signal.SIGQUIT, marker)
    try:
        close_all([KillsTheOthers(), None, Plain()])
        assert closed == ["first", "second"]
        assert signal.getsignal(signal.SIGQUIT) is marker
        with sigquit_ignored():
            assert signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGQUIT) is marker
    finally:
        signal.signal(signal.SIGQUIT, previous)


def test_close_all_closes_the_rest_when_one_fails():
    closed: list[str] = []

    class Fails:
        def close(self):
            raise RuntimeError("boom")

    class Plain:
        def close(self):
            closed.append("plain")

    with pytest.raises(RuntimeError, match="boom"):
        close_all([Fails(), Plain()])
    assert closed == ["plain"]


# ---- defect 5: hidden states under a prefill budget ----------------------------------------
def test_calls_are_split_under_the_token_budget():
    from kubedistill.teacher.sglang_states import budget_groups

    lengths = [300, 500, 200, 900, 1200, 100, 100]
    groups = budget_groups(lengths, 1000)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # all, in order
    for g in groups:
        assert sum(lengths[i] for i in g) <= 1000 or len(g) == 1
    assert groups == [[0, 1, 2], [3], [4], [5, 6]]
    assert budget_groups([], 10) == []


def test_hidden_states_need_exactly_one_block_of_exactly_n_rows():
    from kubedistill.teacher.sglang_states import prefill_states

    block = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(prefill_states([block.tolist()], 4, 3), block)
    with pytest.raises(KubedistillError, match=r"shape \(5, 3\)"):  # extra rows: chunked
        prefill_states([torch.zeros(5, 3).tolist()], 4, 3)
    with pytest.raises(KubedistillError, match=r"shape \(3, 3\)"):
        prefill_states([block[:3].tolist()], 4, 3)
    with pytest.raises(KubedistillError, match="2 hidden-state blocks"):  # decode blocks
        prefill_states([block.tolist(), [0.0, 1.0, 2.0]], 4, 3)
    with pytest.raises(KubedistillError, match="4 hidden-state blocks"):  # [L][d], no block
        prefill_states(block.tolist(), 4, 3)


def test_probe_tolerance_admits_bf16_rounding():
    from kubedistill.teacher.sglang import probe_tolerance

    logits = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)) * 6  # |z| <~ 30
    ref = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    err = float((torch.log_softmax(logits, dim=-1) - ref).abs().max())
    assert 0.05 < err < probe_tolerance("bfloat16")  # 0.05 would refuse a good engine
    assert probe_tolerance("float32") < 0.05


# ---- defect 7: flash-attn and float32 --------------------------------------------------------
def test_flash_attention_falls_back_to_sdpa_for_float32(monkeypatch):
    from kubedistill.models.loading import resolve_attn_implementation

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    resolve_attn_implementation.cache_clear()
    try:
        fa = "flash_attention_2"
        assert resolve_attn_implementation(fa, "cuda", torch.bfloat16) == fa
        assert resolve_attn_implementation(fa, "cuda", torch.float32) == "sdpa"
        assert resolve_attn_implementation(fa, "cpu", torch.bfloat16) == "sdpa"
        assert resolve_attn_implementation("eager", "cuda", torch.float32) == "eager"
    finally:
        resolve_attn_implementation.cache_clear()


# ---- import cycles -----------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every kubedistill module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("kubedistill"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kubedistill"))
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in RUNTIME.rglob("*.py"):
        rel = path.relative_to(RUNTIME.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        modules[name] = path
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return False


@pytest.mark.parametrize("protocol,implementations", [
    ("kubedistill.rollout.engine", ("kubedistill.rollout.hf", "kubedistill.rollout.sglang")),
    ("kubedistill.train.trainer", ("kubedistill.train.on_policy",)),
])
def test_no_import_cycle_between_protocols_and_implementations(protocol, implementations):
    graph = _module_graph()
    for impl in implementations:
        assert _reaches(graph, impl, protocol), f"{impl} should build on {protocol}"
        assert not _reaches(graph, protocol, impl), f"{protocol} imports {impl}: a cycle"


def test_lifecycle_modules_import_no_backend():
    graph = _module_graph()
    for name in ("kubedistill.lifecycle", "kubedistill.sglang_engine"):
        assert not any(_reaches(graph, name, b) for b in
                       ("kubedistill.rollout.sglang", "kubedistill.teacher.sglang")), name
    assert os.path.exists(RUNTIME / "lifecycle.py")


# ---- on a GPU (skipped without CUDA) ---------------------------------------------------------
@pytest.mark.gpu
def test_sglang_teacher_states_survive_sleep_and_a_long_call(smollm2_dir):
    pytest.importorskip("sglang")
    from kubedistill.teacher.sglang import SGLangTeacherEngine

    cfg = load_config(None, {"teacher_tp_size": 1, "teacher_mem_fraction_static": 0.3,
                             "enable_sleep": True, "teacher_batch_tokens": 256})
    engine = SGLangTeacherEngine.from_config(cfg, smollm2_dir)
    try:
        seqs = [list(range(100, 100 + n)) for n in (40, 300, 120, 90)]  # one over the budget
        pos = [list(range(n)) for n in (40, 300, 120, 90)]
        engine.wake()  # never slept: a no-op
        before = engine.final_states(seqs, pos)
        engine.sleep()
        engine.wake()
        after = engine.final_states(seqs, pos)
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b)  # enable_weights_cpu_backup
    finally:
        close_all([engine])
