"""Models: the packaged real SmolLM2, students derived from it, tiny models, the teacher head."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubedistill.errors import ConfigError
from kubedistill.models import load_causal_lm, load_tokenizer, resolve_model_path
from kubedistill.models.derive import derive_student, parse_layers
from kubedistill.teacher.head import TeacherHead


def test_packaged_smollm2_is_the_real_model(smollm2_dir):
    assert resolve_model_path("packaged:smollm2-135m-instruct") == smollm2_dir
    tok = load_tokenizer(smollm2_dir)
    model = load_causal_lm(smollm2_dir)
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "4" in answer


def test_derived_student_reuses_the_chosen_teacher_layers(smollm2_dir, tmp_path):
    out = derive_student(smollm2_dir, "0,15,29", str(tmp_path / "student"))
    student = AutoModelForCausalLM.from_pretrained(out)
    teacher = load_causal_lm(smollm2_dir)
    assert student.config.num_hidden_layers == 3
    for j, i in enumerate([0, 15, 29]):
        torch.testing.assert_close(student.model.layers[j].mlp.up_proj.weight,
                                   teacher.model.layers[i].mlp.up_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight)
    assert AutoTokenizer.from_pretrained(out).chat_template == load_tokenizer(
        smollm2_dir).chat_template


def test_layer_spec_errors():
    assert parse_layers("0,2,5") == [0, 2, 5]
    with pytest.raises(ConfigError, match="strictly increasing"):
        parse_layers("3,1")


def test_missing_model_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="unknown packaged model"):
        resolve_model_path("packaged:gpt-17")


def test_teacher_head_rebuilds_logits_exactly(tiny_model_dir, tmp_path):
    model = load_causal_lm(tiny_model_dir)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.model(ids).last_hidden_state
    head = TeacherHead.from_model(model)
    head.save(str(tmp_path / "cache"))
    rebuilt = TeacherHead.load(str(tmp_path / "cache")).logits(hidden)
    torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)


def test_teacher_head_applies_softcap_and_scale():
    w = torch.randn(7, 4)
    h = torch.randn(3, 4) * 10
    head = TeacherHead(w, scale=0.5, softcap=2.0)
    expected = torch.tanh((h @ w.T) * 0.5 / 2.0) * 2.0
    torch.testing.assert_close(head.logits(h), expected)
    assert head.logits(h).abs().max() <= 2.0


def test_bf16_teacher_head_follows_in_place_updates():
    """The float32 copy of a bf16 head and a vocabulary-restricted head are reused, and
    rebuilt when the weight changes in place (the self-distillation teacher's head is
    updated with copy_)."""
    head = TeacherHead(torch.randn(7, 4).to(torch.bfloat16))
    h = torch.randn(3, 4)
    first = head.logits(h)
    assert head.weight32() is head.weight32()  # one copy while the weight is unchanged
    torch.testing.assert_close(first, h @ head.weight.float().T)
    ids = torch.tensor([5, 0, 3])
    sub = head.select(ids)
    assert head.select(ids) is sub and "_selected" not in dict(head.named_modules())
    torch.testing.assert_close(sub.logits(h), first[:, ids])
    head.weight.copy_(torch.randn(7, 4).to(torch.bfloat16))
    torch.testing.assert_close(head.logits(h), h @ head.weight.float().T)
    assert not torch.equal(head.logits(h), first)
    torch.testing.assert_close(head.select(ids).logits(h), head.logits(h)[:, ids])
