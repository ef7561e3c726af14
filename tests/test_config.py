"""Configuration: KDFlow names and defaults, typo suggestions, recipes, consistency checks."""

from pathlib import Path

import pytest

from kubedistill.cli import main
from kubedistill.config import FIELD_GROUP, Config, load_config, parse_overrides
from kubedistill.errors import ConfigError

KDFLOW_DEFAULTS = {
    "attn_implementation": "flash_attention_2", "lora_rank": 0, "lora_alpha": 16,
    "target_modules": "all-linear", "num_gpus_per_node": 8, "train_batch_size": 128,
    "micro_train_batch_size": 1, "learning_rate": 1e-6, "lr_scheduler": "cosine_with_min_lr",
    "lr_warmup_ratio": 0.05, "min_lr": 1e-8, "adam_betas": (0.9, 0.98), "backend": "fsdp2",
    "save_path": "./ckpt/", "ckpt_path": "./ckpt/checkpoints_distill", "seed": 42,
    "fsdp_size": -1, "kd_ratio": 0.5, "kd_temperature": 1.0, "kd_algorithm": "vanilla_kd",
    "kd_loss_fn": "kl", "teacher_tp_size": 8, "teacher_mem_fraction_static": 0.4,
    "teacher_offload_tags": "all", "dskd_token_align": "eta", "dskd_topk_vocab": -1,
    "dskd_projector_lr": 1e-4, "jsd_beta": 0.5, "skew_lambda": 0.1, "adaptive_alpha": 0.5,
    "hrl_topk": 5, "teacher_update_freq": 1, "teacher_ema_decay": 0.999,
    "rollout_batch_size": 32, "generate_max_len": 2048, "rollout_mem_fraction_static": 0.6,
    "input_key": "messages", "max_len": 4096, "prompt_max_len": 2048, "eval_split": "eval",
    "preprocess_num_workers": 8, "logging_steps": 10, "apply_chat_template": True,
}

KDFLOW_NAMES = """student_name_or_path teacher_name_or_path attn_implementation use_liger_kernel
lora_rank lora_alpha target_modules lora_dropout ring_attn_size enable_thinking
disable_fast_tokenizer num_nodes num_gpus_per_node num_epochs train_batch_size
micro_train_batch_size learning_rate lr_scheduler lr_warmup_ratio min_lr max_norm weight_decay
adam_betas backend gradient_checkpointing enable_sleep eval_steps save_steps save_path
ckpt_path seed bf16 use_dynamic_bsz max_token_len_per_gpu fsdp_size cpu_offload kd_ratio
kd_temperature kd_algorithm kd_loss_fn teacher_tp_size teacher_ep_size teacher_pp_size
teacher_dp_size teacher_forward_n_batches teacher_mem_fraction_static teacher_offload_tags
teacher_quantization dskd_token_align dskd_topk_vocab dskd_projector_lr jsd_beta skew_lambda
adaptive_alpha hrl_topk teacher_update_freq use_ema_teacher teacher_ema_decay
rollout_num_engines rollout_tp_size rollout_batch_size n_samples_per_prompt generate_max_len
temperature top_p rollout_mem_fraction_static print_rollout_sample train_dataset_path
train_dataset_probs train_split eval_dataset_path eval_split input_key output_key image_key
teacher_input_key label_key apply_chat_template max_len prompt_max_len max_samples
packing_samples preprocess_num_workers logging_steps""".split()


def test_every_kdflow_argument_is_accepted_with_its_default():
    missing = [n for n in KDFLOW_NAMES if n not in FIELD_GROUP]
    assert missing == []
    flat = Config().to_dict(flat=True)
    for name, default in KDFLOW_DEFAULTS.items():
        assert flat[name] == default, name


def test_flat_and_grouped_spellings_and_kdflow_boolean_flags():
    cfg = load_config(None, parse_overrides(
        ["--kd_ratio", "0.3", "--kd.kd_loss_fn=rkl", "--bf16", "--adam_betas", "0.9,0.95",
         "--teacher_quantization", "None", "--save_steps", "-1"]))
    assert cfg.kd.kd_ratio == 0.3 and cfg.kd.kd_loss_fn == "rkl"
    assert cfg.train.bf16 is True and cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.kd.teacher_quantization is None and cfg.train.save_steps == -1


def test_typo_is_caught_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'kd_temperature'"):
        parse_overrides(["--kd_temprature", "2"])
    with pytest.raises(ConfigError, match="did you mean 'kd.kd_ratio'"):
        load_config(None, {"kd.kd_rato": 0.1})


def test_recipe_typo_names_closest_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kd:\n  kd_ratio: 0.2\ntrain:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat.*learning_rate"):
        load_config(recipe)


def test_recipe_flat_and_grouped(tmp_path):
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("kd:\n  kd_ratio: 0.2\nlearning_rate: 1e-4\nbf16: true\n")
    cfg = load_config(recipe, {"kd_ratio": "0.7"})
    assert cfg.name == "quick" and cfg.kd.kd_ratio == 0.7
    assert cfg.train.learning_rate == 1e-4 and cfg.train.bf16 is True


def test_wrong_types_and_inconsistent_combinations_fail_early():
    with pytest.raises(ConfigError, match="train_batch_size.*cannot read"):
        load_config(None, {"train_batch_size": "lots"})
    with pytest.raises(ConfigError, match="kd_ratio must be in"):
        load_config(None, {"kd_ratio": 1.5})
    with pytest.raises(ConfigError, match="cache_dtype.*did you mean 'bf16'"):
        load_config(None, {"cache_dtype": "bf61"})


def test_global_batch_must_divide_by_micro_batch_times_world():
    cfg = load_config(None, {"train_batch_size": 10, "micro_train_batch_size": 2})
    with pytest.raises(ConfigError, match="not divisible.*multiple of 4"):
        cfg.validate(world_size=2)
    cfg.validate(world_size=1)


def test_cli_exit_code_and_message_for_typo(capsys):
    code = main(["prepare", "--max_lne", "10", "--print_config"])
    assert code == 2
    assert "did you mean 'max_len'" in capsys.readouterr().err
    assert main(["prepare", "--max_len", "10", "--print_config"]) == 0
    assert "max_len: 10" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.validate(cfg.train.num_gpus_per_node) is cfg
    assert cfg.storage.work_dir.startswith("./runs/")
