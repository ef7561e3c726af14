"""Algorithm and loss registries: built-ins, user registration, plugins, errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from kubedistill.algorithms import (
    ALGORITHMS,
    Algorithm,
    MicroBatch,
    build_algorithm,
    register_algorithm,
)
from kubedistill.config import Config
from kubedistill.errors import ConfigError
from kubedistill.losses import LOSSES, register_loss, registry
from kubedistill.teacher.head import TeacherHead


def batch_and_inputs(n=12, d=8, v=40, dt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = MicroBatch(input_ids=torch.zeros(1, n + 1, dtype=torch.long),
                       position_ids=torch.arange(n + 1)[None], attention_mask=None,
                       loss_index=torch.arange(n), target_ids=torch.randint(0, v, (n,), generator=g),
                       teacher_hidden=torch.randn(n, dt, generator=g))
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    head = TeacherHead(torch.randn(v, dt, generator=g))
    return batch, hidden, weight, head


def config(**kd):
    cfg = Config()
    for key, value in kd.items():
        cfg.set(key, value)
    return cfg


@pytest.mark.parametrize("squared", [True, False, None])
@pytest.mark.parametrize("chunk", [None, 5])
def test_vanilla_kd_is_the_documented_mix(squared, chunk):
    """None: the default, which is KDFlow's (no T^2 factor)."""
    batch, hidden, weight, head = batch_and_inputs()
    flag = {} if squared is None else {"kd_temperature_squared": squared}
    cfg = config(kd_ratio=0.25, kd_temperature=2.0, kd_loss_fn="skl", skew_lambda=0.3,
                 chunked_loss_size=chunk, **flag)
    algo = build_algorithm(cfg, head, hidden.shape[1])
    out = algo(batch, hidden, weight, normalizer=30)
    s = hidden @ weight.T
    ce = torch.nn.functional.cross_entropy(s, batch.target_ids, reduction="sum") / 30
    skl = LOSSES["skl"](s, head.logits(batch.teacher_hidden), temperature=2.0,
                        skew_lambda=0.3).sum() / 30
    c = 4.0 if squared else 1.0
    torch.testing.assert_close(out["loss"], 0.75 * ce + 0.25 * c * skl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"], skl.detach(), rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert hidden.grad is not None and weight.grad is not None


def test_loss_divides_by_the_global_normalizer():
    batch, hidden, weight, head = batch_and_inputs()
    algo = build_algorithm(config(), head)
    a = algo(batch, hidden, weight, normalizer=12)["loss"]
    b = algo(batch, hidden, weight, normalizer=48)["loss"]
    torch.testing.assert_close(a, 4 * b)


def test_sft_is_ce_only_without_teacher():
    batch, hidden, weight, _ = batch_and_inputs()
    batch.teacher_hidden = None
    algo = build_algorithm(config(kd_algorithm="sft"), None)
    assert not algo.needs_teacher and algo.name == "sft"
    out = algo(batch, hidden, weight, normalizer=12)
    assert set(out) == {"loss", "ce"}
    torch.testing.assert_close(out["loss"],
                               torch.nn.functional.cross_entropy(hidden @ weight.T,
                                                                 batch.target_ids))


def test_teacher_head_is_not_in_the_checkpoint():
    _, _, _, head = batch_and_inputs()
    algo = build_algorithm(config(), head)
    assert not any(k.startswith("teacher_head.") for k in algo.state_dict())
    algo.load_state_dict(algo.state_dict())  # strict load still works
    assert algo.teacher_head is head


@pytest.mark.parametrize("key, value, suggestion", [
    ("kd_algorithm", "vanila_kd", "vanilla_kd"),
    ("kd_loss_fn", "jsdd", "jsd"),
    ("kd_loss_fn", "reverse_kl", "rkl"),
])
def test_unknown_names_suggest_the_closest(key, value, suggestion):
    _, _, _, head = batch_and_inputs()
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        build_algorithm(config(**{key: value}), head)


def test_user_loss_and_algorithm_selected_by_name():
    @register_loss("test_half_kl")
    def half_kl(student_logits, teacher_logits, *, temperature=1.0, **hparams):
        """Half the forward KL."""
        return 0.5 * LOSSES["kl"](student_logits, teacher_logits, temperature=temperature)

    @register_algorithm("test_kd_only")
    class KDOnly(Algorithm):
        def forward(self, batch, hidden, lm_head_weight, normalizer):
            s = hidden @ lm_head_weight.T
            kd = LOSSES[self.config.kd.kd_loss_fn](s, self.teacher_head(batch.teacher_hidden))
            return {"loss": kd.sum() / normalizer}

    try:
        batch, hidden, weight, head = batch_and_inputs()
        vanilla = build_algorithm(config(kd_ratio=1.0, kd_loss_fn="test_half_kl"), head)
        mine = build_algorithm(config(kd_algorithm="test_kd_only", kd_loss_fn="test_half_kl"),
                               head)
        assert isinstance(mine, KDOnly) and mine.name == "test_kd_only"
        torch.testing.assert_close(vanilla(batch, hidden, weight, 12)["loss"],
                                   mine(batch, hidden, weight, 12)["loss"])
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_half_kl")(lambda s, t, **k: s)
        with pytest.raises(TypeError, match="needs an Algorithm subclass"):
            register_algorithm("test_not_a_class")(half_kl)
    finally:
        LOSSES.pop("test_half_kl", None)
        ALGORITHMS.pop("test_kd_only", None)


def test_plugins_from_the_environment(tmp_path, monkeypatch):
    module = "kd_plugin_for_tests"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from kubedistill.algorithms import Algorithm, register_algorithm
        from kubedistill.losses import register_loss

        @register_loss("plugin_zero")
        def zero(student_logits, teacher_logits, *, temperature=1.0, **hparams):
            \"\"\"Always 0.\"\"\"
            return student_logits.float().sum(-1) * 0.0

        @register_algorithm("plugin_algo")
        class PluginAlgo(Algorithm):
            needs_teacher = False

            def forward(self, batch, hidden, lm_head_weight, normalizer):
                return {"loss": hidden.sum() * 0.0}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "plugin_zero" not in dict.keys(LOSSES)  # nothing imported yet
        monkeypatch.setenv("KUBEDISTILL_PLUGINS", f" {module} ,")
        algo = build_algorithm(config(kd_algorithm="plugin_algo", kd_loss_fn="plugin_zero"))
        assert type(algo).__name__ == "PluginAlgo"
        assert "plugin_zero" in LOSSES
        batch, hidden, weight, head = batch_and_inputs()
        out = build_algorithm(config(kd_loss_fn="plugin_zero", kd_ratio=1.0), head)(
            batch, hidden, weight, 12)
        assert float(out["loss"].detach()) == 0.0
    finally:
        LOSSES.pop("plugin_zero", None)
        ALGORITHMS.pop("plugin_algo", None)
        registry._imported.discard(module)
        sys.modules.pop(module, None)


def test_missing_plugin_module_is_a_config_error(monkeypatch):
    monkeypatch.setenv("KUBEDISTILL_PLUGINS", "no_such_kubedistill_plugin_xyz")
    with pytest.raises(ConfigError, match="no_such_kubedistill_plugin_xyz"):
        LOSSES.lookup("kl")
