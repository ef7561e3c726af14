"""KDFlow drop-in: KDFlow's own example scripts (tests/kdflow_examples/, paths swapped for
local ones) through the new entry points' parser, KDFlow's flag syntaxes, the W&B -> MLflow
mapping, refusals that name their reason, and ``pipeline submit`` with the same flags."""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import pytest

from kubedistill.cli import kdflow
from kubedistill.config import load_config, parse_overrides
from kubedistill.errors import ConfigError

EXAMPLES = Path(__file__).parent / "kdflow_examples"
PATHS = {"STUDENT": "/models/student", "TEACHER": "/models/teacher",
         "DATA": "packaged:gsm8k-train"}


def example_argv(name: str, paths: dict[str, str] = PATHS) -> tuple[str, list[str]]:
    """(entry point, argv) of one example script, as bash would expand ``$OPTS``."""
    text = (EXAMPLES / name).read_text()
    opts = " ".join(re.findall(r'^OPTS\+="([^"]*)"', text, re.M))
    for var, value in paths.items():
        opts = opts.replace("${" + var + "}", value)
    assert "${" not in opts, opts
    prog = re.search(r"^python -m kubedistill\.cli\.(\w+) \$OPTS$", text, re.M).group(1)
    return prog, shlex.split(opts)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def resolve(name: str):
    prog, argv = example_argv(name)
    return prog, kdflow.resolve(prog, argv)[2]


COMMON = {  # every example script sets these the same way
    "num_nodes": 1, "num_gpus_per_node": 8, "backend": "fsdp2", "train_batch_size": 128,
    "lr_warmup_ratio": 0.05, "num_epochs": 1, "bf16": True, "gradient_checkpointing": True,
    "max_len": 4096, "input_key": "conversations", "apply_chat_template": True,
    "preprocess_num_workers": 32, "enable_thinking": False, "logging_steps": 10,
    "use_wandb": True, "wandb_project": "KDFlow", "wandb_mode": "offline",
    "adam_betas": (0.9, 0.98), "experiment_name": "KDFlow"}

CASES = {
    "off_policy_kd__run_qwen3_30b_a3b_to_4b.sh": ("train_kd_off_policy", {
        "micro_train_batch_size": 2, "learning_rate": 2e-5, "enable_sleep": False,
        "packing_samples": True, "kd_ratio": 0.5, "kd_loss_fn": "kl",
        "kd_algorithm": "vanilla_kd", "teacher_forward_n_batches": 10, "teacher_dp_size": 2,
        "teacher_tp_size": 4, "teacher_mem_fraction_static": 0.4,
        "run_name": "qwen3_30b_a3b_to_4b_vanilla_kd", "run_tags": "group=off_policy_kd"}),
    "off_policy_kd__run_qwen3_vl_30b_a3b_to_4b.sh": ("train_kd_off_policy", {
        "micro_train_batch_size": 8, "enable_sleep": True, "image_key": "image",
        "packing_samples": False, "teacher_mem_fraction_static": 0.6,
        "run_tags": "group=off_policy_kd_vl"}),
    "on_policy_kd__run_qwen3_30b_a3b_to_4b.sh": ("train_kd_on_policy", {
        "micro_train_batch_size": 8, "learning_rate": 2e-6, "enable_sleep": True,
        "rollout_batch_size": 1024, "rollout_num_engines": 8, "rollout_tp_size": 1,
        "rollout_mem_fraction_static": 0.6, "n_samples_per_prompt": 1,
        "prompt_max_len": 2048, "generate_max_len": 2048, "kd_ratio": 1.0,
        "kd_loss_fn": "rkl", "run_tags": "group=on_policy_kd"}),
    "on_policy_kd__run_qwen3_vl_30b_a3b_to_4b.sh": ("train_kd_on_policy", {
        "image_key": "image", "packing_samples": False, "kd_loss_fn": "rkl"}),
    "cross_tokenizer_kd__run_qwen3_30b_a3b_to_llama3_2_3b_offpolicy.sh": (
        "train_kd_off_policy", {"kd_algorithm": "dskd", "dskd_topk_vocab": 20000,
                                "dskd_token_align": "eta", "dskd_projector_lr": 5e-4,
                                "teacher_forward_n_batches": 10,
                                "run_name": "qwen3_30b_a3b_to_llama3.2_3b_dskd"}),
    "cross_tokenizer_kd__run_qwen3_30b_a3b_to_llama3_2_3b_offpolicy_simple_ctkd.sh": (
        "train_kd_off_policy", {"kd_algorithm": "simple_ctkd", "kd_ratio": 0.5}),
    "cross_tokenizer_kd__run_qwen3_30b_a3b_to_llama3_2_3b_onpolicy.sh": (
        "train_kd_on_policy", {"kd_algorithm": "dskd", "kd_ratio": 1.0, "kd_loss_fn": "rkl",
                               "rollout_num_engines": 8, "enable_sleep": True}),
    "cross_tokenizer_kd__run_qwen3_30b_a3b_to_llama3_2_3b_onpolicy_simple_ctkd.sh": (
        "train_kd_on_policy", {"kd_algorithm": "simple_ctkd",
                               "run_tags": "group=cross_tokenizer_kd_onpolicy"}),
    "sft__run_qwen3_4b.sh": ("train_sft", {
        "kd_algorithm": "sft", "enable_sleep": False, "train_enable_sleep": False,
        "micro_train_batch_size": 2, "run_name": "qwen3_4b_sft"}),
}


def test_every_example_script_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.sh")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_flag_set_resolves_with_kdflow_meanings(name, in_tmp):
    prog, cfg = resolve(name)
    want_prog, values = CASES[name]
    assert prog == want_prog
    flat = cfg.to_dict(flat=True)
    for key, value in {**COMMON, **values}.items():
        assert flat[key] == value, key
    assert cfg.model.student_name_or_path == "/models/student"
    assert cfg.data.train_dataset_path == "packaged:gsm8k-train"
    if prog != "train_sft":
        assert cfg.model.teacher_name_or_path == "/models/teacher"
    # paths keep KDFlow's meaning, relative to the current directory
    save = re.search(r'--save_path ([^"\s]+)', (EXAMPLES / name).read_text()).group(1)
    assert cfg.train.save_path == str(in_tmp / save)
    assert cfg.name == Path(save).name
    assert cfg.storage.work_dir == str(in_tmp / "runs" / Path(save).name)
    # W&B offline -> the local MLflow store in wandb_dir
    assert cfg.tracking.tracking_uri == f"sqlite:///{in_tmp / 'output'}/mlflow.db"


# Every field of KDFlow's argument dataclasses (kdflow/arguments/*.py) with its default,
# plus the flags its newer argument reference documents.
KDFLOW_FLAGS = {
    # DataArguments
    "train_dataset_path": None, "train_dataset_probs": None, "train_split": "train",
    "eval_dataset_path": None, "eval_split": "eval", "input_key": "messages",
    "image_key": None, "output_key": None, "teacher_input_key": None, "label_key": None,
    "input_template": None, "apply_chat_template": True, "max_len": 4096,
    "max_samples": 100_000_000, "packing_samples": False, "prompt_max_len": 2048,
    "preprocess_num_workers": 8, "custom_eval_fn": None,
    "teacher_routing_key": "teacher_routing_key",
    # ModelArguments
    "student_name_or_path": None, "teacher_name_or_path": None,
    "attn_implementation": "flash_attention_2", "use_liger_kernel": False, "lora_rank": 0,
    "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0,
    "disable_fast_tokenizer": False, "enable_thinking": False, "ring_attn_size": 1,
    # TrainingArguments (+ checkpoint arguments)
    "num_nodes": 1, "num_gpus_per_node": 8, "num_epochs": 1, "train_batch_size": 128,
    "micro_train_batch_size": 1, "learning_rate": 1e-6, "lr_warmup_ratio": 0.05,
    "min_lr": 1e-8, "lr_scheduler": "cosine_with_min_lr", "max_norm": 1.0,
    "weight_decay": 0.0, "adam_betas": (0.9, 0.98), "eval_steps": -1, "save_steps": -1,
    "backend": "fsdp2", "gradient_checkpointing": False,
    "gradient_checkpointing_use_reentrant": False, "teacher_offload": False,
    "train_enable_sleep": False, "enable_sleep": False, "full_determinism": False,
    "load_checkpoint": False, "ckpt_path": "./ckpt/checkpoints_distill",
    "save_path": "./ckpt/", "seed": 42, "use_dynamic_bsz": False,
    "max_token_len_per_gpu": 0, "bf16": False, "local_rank": -1, "chunked_loss_size": None,
    "save_training_state": False, "resume_from": None, "resume_training": False,
    "max_ckpt_num": -1,
    # FSDPArguments
    "fsdp_size": -1, "cpu_offload": False,
    # DistillationArguments (kd_temperature_squared etc. are kubedistill's own)
    "kd_ratio": 0.5, "kd_temperature": 1.0, "kd_algorithm": "vanilla_kd",
    "kd_loss_fn": "kl", "teacher_forward_n_batches": 1, "teacher_enable_sleep": False,
    "teacher_offload_tags": "all", "teacher_quantization": None, "teacher_tp_size": 8,
    "teacher_ep_size": 1, "teacher_pp_size": 1, "teacher_dp_size": 1,
    "teacher_mem_fraction_static": 0.4, "teacher_update_freq": 1,
    "dskd_token_align": "eta", "dskd_topk_vocab": -1, "dskd_projector_lr": 1e-4,
    "jsd_beta": 0.5, "skew_lambda": 0.1, "adaptive_alpha": 0.5, "hrl_topk": 5,
    "use_ema_teacher": False, "teacher_ema_decay": 0.999, "multi_teacher_config": None,
    # RolloutArguments
    "rollout_num_engines": 0, "rollout_tp_size": 1, "rollout_enable_sleep": False,
    "rollout_mem_fraction_static": 0.6, "top_p": 1.0, "temperature": 1.0,
    "n_samples_per_prompt": 1, "rollout_batch_size": 32, "generate_max_len": 2048,
    "print_rollout_sample": False,
    # LoggingArguments
    "logging_steps": 10, "use_wandb": False, "wandb_org": None, "wandb_project": None,
    "wandb_group": None, "wandb_run_name": None, "wandb_mode": "online",
    "wandb_dir": None, "sync_swanlab": False,
}


def test_every_kdflow_flag_exists_with_kdflow_default_and_type():
    from kubedistill.config import FIELD_TYPES, Config

    flat = Config().to_dict(flat=True)
    assert [k for k in KDFLOW_FLAGS if k not in flat] == []
    for key, default in KDFLOW_FLAGS.items():
        assert flat[key] == default and type(flat[key]) is type(default), key
    assert FIELD_TYPES["print_rollout_sample"] is bool


def test_kdflow_flag_syntaxes():
    cfg = load_config(None, parse_overrides(
        ["--adam_betas", "(0.9, 0.95)", "--print_rollout_sample", "True", "--bf16",
         "--gradient_checkpointing=true", "--no_apply_chat_template", "--input_template",
         "Q: {} A:", "--packing_samples", "f", "--max_samples", "1e8", "--kd-ratio", "0.2"]))
    assert cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.rollout.print_rollout_sample is True and cfg.train.bf16 is True
    assert cfg.train.gradient_checkpointing is True and cfg.data.apply_chat_template is False
    assert cfg.data.input_template == "Q: {} A:" and cfg.data.packing_samples is False
    assert cfg.data.max_samples == 100_000_000 and cfg.kd.kd_ratio == 0.2
    with pytest.raises(ConfigError, match="print_rollout_sample.*bool"):
        load_config(None, {"print_rollout_sample": "2"})
    with pytest.raises(ConfigError, match="adam_betas"):
        load_config(None, {"adam_betas": "(0.9)"})


def test_kdflow_defaults_that_used_to_differ():
    cfg = load_config(None, {})
    assert cfg.train.chunked_loss_size is None  # KDFlow: None (full logits)
    assert cfg.rollout.print_rollout_sample is False
    assert cfg.logging.wandb_mode == "online" and cfg.logging.use_wandb is False
    assert cfg.train.local_rank == -1 and cfg.data.teacher_routing_key == "teacher_routing_key"


def test_alias_flags_act(caplog):
    with caplog.at_level(logging.INFO, logger="kubedistill.kdflow"):
        cfg = load_config(None, {"teacher_enable_sleep": True, "load_checkpoint": True})
    assert cfg.train.enable_sleep is True and cfg.train.resume is True
    assert "deprecated" in caplog.text
    assert load_config(None, {"resume_training": True}).train.resume is True
    assert load_config(None, {"teacher_offload": True}).train.enable_sleep is True
    assert load_config(None, {}).train.enable_sleep is False


def test_wandb_flags_map_onto_mlflow_with_one_info_line(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    flags = {"use_wandb": True, "wandb_project": "P", "wandb_run_name": "R",
             "wandb_group": "G", "wandb_org": "O", "wandb_mode": "offline",
             "wandb_dir": str(tmp_path / "wb")}
    with caplog.at_level(logging.INFO, logger="kubedistill.kdflow"):
        cfg = load_config(None, flags)
    t = cfg.tracking
    assert (t.experiment_name, t.run_name) == ("P", "R")
    assert dict(x.split("=") for x in t.run_tags.split(",")) == {"group": "G", "org": "O"}
    assert t.tracking_uri == f"sqlite:///{tmp_path / 'wb'}/mlflow.db"  # offline: no server
    lines = [r for r in caplog.records if "W&B" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "experiment" in lines[0].getMessage() and "tag group" in lines[0].getMessage()
    from kubedistill.tracking.runs import resolve_tracking_uri, run_tags

    assert resolve_tracking_uri(cfg) == t.tracking_uri and (tmp_path / "wb").is_dir()
    assert run_tags(cfg)["group"] == "G"
    assert load_config(None, {"use_wandb": True, "wandb_mode": "disabled"}
                       ).tracking.tracking_uri == "off"
    # online keeps the configured server; without use_wandb nothing is mapped (as KDFlow)
    online = load_config(None, {**flags, "wandb_mode": "online", "wandb_dir": None})
    assert online.tracking.tracking_uri is None and online.tracking.experiment_name == "P"
    assert load_config(None, {**flags, "use_wandb": False}).tracking.experiment_name == (
        "kubedistill")


@pytest.mark.parametrize("flags, reason", [
    ({"ring_attn_size": 2}, "ring attention .* not implemented"),
    ({"sync_swanlab": True}, "MLflow only"),
    ({"multi_teacher_config": "t.json"}, "multi-teacher"),
    ({"custom_eval_fn": "f.py"}, "eval_task"),
    ({"resume_from": "ckpt/step_4"}, "newest complete checkpoint"),
    ({"max_ckpt_num": 3}, "two newest"),
    ({"input_template": "no placeholder", "apply_chat_template": False}, "must contain"),
    ({"input_template": "Q: {}"}, "only without a chat template"),
    ({"backend": "deepspeed"}, "fsdp2"),
    ({"wandb_mode": "sometimes"}, "wandb_mode must be one of"),
    ({"cpu_offload": True, "device": "cpu"}, "cpu_offload needs CUDA"),
    ({"use_liger_kernel": True, "device": "cpu"}, "use_liger_kernel needs CUDA"),
])
def test_unsupported_flags_fail_naming_why(flags, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(None, flags)


def test_cpu_offload_and_liger_refused_on_a_cpu_mesh(world_of_one):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from kubedistill.train.fsdp import shard
    from kubedistill.train.liger import apply_liger_kernels

    mesh = init_device_mesh("cpu", (world_of_one.world_size,))
    with pytest.raises(ConfigError, match="cpu_offload needs CUDA"):
        shard(torch.nn.Linear(2, 2), [], mesh, None, cpu_offload=True)
    with pytest.raises(ConfigError, match="Triton kernels do not run on cpu"):
        apply_liger_kernels(torch.nn.Linear(2, 2), "cpu")


def test_entry_point_refuses_to_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    from kubedistill.cli.train_sft import main

    assert main(["--student_name_or_path", "x"]) == 2
    assert "not under torchrun" in capsys.readouterr().err


def test_print_config_and_typos(in_tmp, capsys):
    from kubedistill.cli.train_kd_off_policy import main

    prog, argv = example_argv("off_policy_kd__run_qwen3_30b_a3b_to_4b.sh")
    assert main(argv + ["--print_config"]) == 0
    assert "wandb_project: KDFlow" in capsys.readouterr().out
    assert main(argv + ["--kd_temprature", "2"]) == 2
    assert "did you mean 'kd_temperature'" in capsys.readouterr().err


def test_pipeline_submit_takes_the_same_flags(tmp_path):
    from kubedistill.pipelines import cli

    calls = {}

    class FakeClient:
        def __init__(self, host):
            calls["host"] = host

        def create_run_from_pipeline_package(self, path, arguments, run_name, experiment_name):
            calls["arguments"] = arguments
            return type("R", (), {"run_id": "run-1"})()

    _, argv = example_argv("sft__run_qwen3_4b.sh")
    parser = cli.build_parser()
    args, flags = parser.parse_known_args(["submit", "--host", "http://kfp:8888",
                                           "--pipeline", "sft", *argv])
    assert cli._submit(args, client_factory=FakeClient, flags=flags) == 0
    overrides = json.loads(calls["arguments"]["overrides"])
    assert calls["arguments"]["recipe"] == ""
    assert overrides["wandb_project"] == "KDFlow" and overrides["name"] == "qwen3_4b"
    assert overrides["save_path"] == "./output/qwen3_4b"  # relative: {work_dir}/model in a pod
    assert overrides["kd_algorithm"] == "sft" and "work_dir" not in overrides
    cfg = load_config(None, overrides)
    assert cfg.tracking.experiment_name == "KDFlow" and cfg.train.micro_train_batch_size == 2
    args, flags = parser.parse_known_args(["submit", "--host", "h", "--kd_rato", "1"])
    with pytest.raises(ConfigError, match="did you mean"):
        cli._submit(args, client_factory=FakeClient, flags=flags)


def test_full_determinism_turns_on_deterministic_kernels():
    import os

    import torch

    from kubedistill.train.trainer import _seed_everything

    assert not torch.are_deterministic_algorithms_enabled()
    saved = dict(os.environ)
    try:
        _seed_everything(3, full_determinism=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
        os.environ.clear()
        os.environ.update(saved)
    _seed_everything(3)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_use_reentrant_reaches_the_model(tiny_model_dir, reentrant,
                                                               world_of_one):
    from kubedistill.train.student import load_student

    cfg = load_config(None, {"gradient_checkpointing": True, "device": "cpu",
                             "gradient_checkpointing_use_reentrant": reentrant,
                             "attn_implementation": "sdpa"})
    model, _ = load_student(tiny_model_dir, cfg, world_of_one)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing is True
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is reentrant


def test_input_template_formats_plain_prompts_without_a_chat_template():
    from kubedistill.data.chat import normalise

    data = load_config(None, {"input_key": "q", "output_key": "a", "apply_chat_template": False,
                              "input_template": "Question: {}\nAnswer:"}).data
    conv = normalise({"q": "1+1?", "a": "2"}, data)
    assert conv.messages[0] == {"role": "user", "content": "Question: 1+1?\nAnswer:"}
    assert conv.messages[-1]["content"] == "2"
    plain = load_config(None, {"input_key": "t", "apply_chat_template": False,
                               "input_template": "<{}>"}).data
    assert normalise({"t": "hello"}, plain).text == "<hello>"
    data.input_template = None
    assert normalise({"q": "1+1?", "a": "2"}, data).messages[0]["content"] == "1+1?"
