"""The whole recipe is checked before any stage runs: every key of every stage, registries
included, all problems in one error; YAML syntax errors name the file and line."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from kubedistill.cli import main
from kubedistill.config import FIELD_GROUP, FIELD_TYPES, Config, load_config
from kubedistill.errors import ConfigError
from kubedistill.validation import FIELD_RULES, REGISTRY_FIELDS

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def _numeric(typ) -> bool:
    args = [a for a in typing.get_args(typ) if a is not type(None)] or [typ]
    base = typing.get_origin(args[0]) or args[0]
    return base in (int, float, tuple)


def test_every_numeric_field_has_a_rule():
    """A new flag cannot land unchecked: each int/float/tuple field needs a range."""
    unchecked = [n for n, t in FIELD_TYPES.items() if _numeric(t) and n not in FIELD_RULES]
    assert unchecked == []
    assert set(FIELD_RULES) <= set(FIELD_GROUP)  # no rule for a field that does not exist
    assert set(REGISTRY_FIELDS) <= set(FIELD_GROUP)


@pytest.mark.parametrize("over, message", [
    ({"kd_loss_fn": "kll"}, r"kd_loss_fn 'kll' is not registered; did you mean 'kl'"),
    ({"kd_algorithm": "vanila_kd"}, r"kd_algorithm 'vanila_kd' .*did you mean 'vanilla_kd'"),
    ({"lr_scheduler": "cosin"}, r"lr_scheduler 'cosin' .*did you mean 'cosine'"),
    ({"train_batch_size": -4}, r"train_batch_size must be >= 1, got -4"),
    ({"max_len": 128, "prompt_max_len": 256}, r"prompt_max_len \(256\) must be <= max_len"),
    ({"learning_rate": 0}, r"learning_rate must be > 0, got 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"eval_steps": 0}, r"eval_steps must be >= 1 or -1, got 0"),
    ({"attn_implementation": "flash"}, r"attn_implementation must be one of"),
    ({"adam_betas": "0.9,1.2"}, r"adam_betas must be in \[0, 1\)"),
    ({"cache_rows_per_shard": 0}, r"cache_rows_per_shard must be >= 1"),
    ({"tracking_end_wait_s": -1}, r"tracking_end_wait_s must be >= 0"),
])
def test_bad_values_are_refused_with_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, over)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError, match=r"has 3 problems: .*train_batch_size.*kd_ratio.*"
                                          r"kd_loss_fn 'kll'"):
        load_config(QUICKSTART, {"train_batch_size": -1, "kd_ratio": 2, "kd_loss_fn": "kll"})


def test_a_plugin_loss_is_a_valid_choice(tmp_path, monkeypatch):
    (tmp_path / "h15_plugin_loss.py").write_text(
        "from kubedistill.losses import register_loss\n"
        "@register_loss('h15_half_kl')\n"
        "def half(s, t, *, temperature=1.0, **kw):\n    return s.sum(-1) * 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KUBEDISTILL_PLUGINS", "h15_plugin_loss")
    assert load_config(QUICKSTART, {"kd_loss_fn": "h15_half_kl"}).kd.kd_loss_fn == "h15_half_kl"


def test_run_fails_before_any_stage(tmp_path, capsys):
    """Before: prepare and the whole teacher cache ran, and train failed on the loss name."""
    work = tmp_path / "run"
    code = main(["run", QUICKSTART, "--kd_loss_fn", "kll", "--work_dir", str(work)])
    assert code == 2
    assert "did you mean 'kl'" in capsys.readouterr().err
    assert not (work / "pipeline.log").exists() and not (work / "prepared").exists()


@pytest.mark.parametrize("argv", [["prepare", "--train_batch_size", "-2"],
                                  ["cache-teacher", "--max_len", "64", "--prompt_max_len", "99"]])
def test_stage_refuses_a_bad_recipe(argv, capsys):
    assert main([*argv, "-c", QUICKSTART]) == 2
    assert "kubedistill: error: recipe 'quickstart'" in capsys.readouterr().err


def test_submit_checks_the_recipe_before_contacting_the_host(tmp_path):
    from kubedistill.pipelines.cli import run_arguments

    with pytest.raises(ConfigError, match="kd_loss_fn 'kll'"):
        run_arguments(QUICKSTART, sets=["kd_loss_fn=kll"])


def test_open_run_component_validates(tmp_path):
    from kubedistill.components import steps

    with pytest.raises(ConfigError, match="train_batch_size must be >= 1"):
        steps.open_run("pr-1", recipe=Path(QUICKSTART).read_text(),
                       overrides='{"train_batch_size": 0}', work_dir=str(tmp_path))


BROKEN = "name: x\nkd:\n  kd_ratio: 0.5\n  kd_loss_fn: [kl\ntrain:\n  seed: 1\n"


@pytest.mark.parametrize("command", [["prepare", "-c"], ["run"]])
def test_yaml_syntax_error_names_file_and_line_without_traceback(tmp_path, command):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(BROKEN)
    env = {**os.environ, "KUBEDISTILL_SYSTEM_METRICS": "0"}
    out = subprocess.run([sys.executable, "-m", "kubedistill.cli", *command, str(recipe),
                          "--work_dir", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{recipe}:5:" in out.stderr and "YAML syntax error" in out.stderr, out.stderr


def test_yaml_error_in_a_component_names_the_line():
    from kubedistill.components.common import build_config

    with pytest.raises(ConfigError, match=r"recipe YAML:5:\d+: YAML syntax error"):
        build_config(BROKEN)


def test_defaults_and_every_recipe_are_valid():
    Config().validate()
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        load_config(recipe)
