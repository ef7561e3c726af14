"""KDFlow flags that act on CUDA only (skipped without CUDA): ``cpu_offload`` (FSDP2
CPUOffloadPolicy) and ``use_liger_kernel`` (Liger's kernels patched into the student)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _student(path: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def test_cpu_offload_keeps_shards_on_the_cpu_and_trains(tiny_model_dir):
    from kubedistill.train.fsdp import build_mesh, init_distributed, shard

    env = init_distributed("cuda")
    assert env.device.type == "cuda" and env.world_size == 1
    model = _student(tiny_model_dir, "cpu")
    shard(model, list(model.model.layers), build_mesh(env), None, cpu_offload=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=env.device)
    before = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        local = param.detach().to_local()
        assert local.device.type == "cpu" and local.is_pinned(), name
    assert any(not torch.equal(before[n], p.detach().to_local())
               for n, p in model.named_parameters())


def test_liger_kernels_patch_the_student_and_keep_its_numerics(tiny_model_dir):
    pytest.importorskip("liger_kernel")
    from kubedistill.train.liger import apply_liger_kernels

    ref = _student(tiny_model_dir, "cuda").eval()
    patched = _student(tiny_model_dir, "cuda").eval()
    apply_liger_kernels(patched, "cuda")
    assert "liger" in type(patched.model.norm).__module__.lower() or \
        "liger" in patched.model.norm.forward.__module__.lower()
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        a = ref.model(input_ids=ids).last_hidden_state
        b = patched.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
