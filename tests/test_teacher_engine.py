"""Teacher engines: backend choice, the hf engine against transformers, the sglang engine
(its pure parts on CPU; the real engine under the ``gpu`` marker)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kubedistill.config import load_config
from kubedistill.teacher.engine import TeacherEngine, resolve_backend
from kubedistill.teacher.hf import HFTeacherEngine
from kubedistill.teacher.sglang import engine_kwargs, prefill_states


def test_auto_backend_without_cuda_or_sglang_is_hf():
    has = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None
    assert resolve_backend("auto") == ("sglang" if has else "hf")
    assert resolve_backend("hf") == "hf"


def test_hf_engine_matches_transformers_and_is_batched(tiny_teacher_dir):
    from kubedistill.models import load_causal_lm

    model = load_causal_lm(tiny_teacher_dir)
    engine = HFTeacherEngine(model, batch_tokens=40)
    assert isinstance(engine, TeacherEngine)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (12, 5, 30, 9, 1)]
    positions = [[0, 3, 11], [4], list(range(29)), [], [0]]
    calls = []
    body = engine.body
    engine.body = lambda **kw: calls.append(kw["input_ids"].shape) or body(**kw)
    out = engine.final_states(seqs, positions)
    # longest first within 40 tokens: [30] alone, then the 12-, 5- and 1-token sequences
    # padded to 12 (3 x 12 = 36); the sequence with no positions is not run at all
    assert [tuple(c) for c in calls] == [(1, 30), (3, 12)]
    with torch.inference_mode():
        for s, p, h in zip(seqs, positions, out, strict=True):
            assert h.shape == (len(p), 96) and h.dtype == torch.float32
            if p:
                want = model(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
                assert torch.allclose(h, want[p], atol=1e-5)


def test_sglang_engine_kwargs_honour_teacher_settings():
    cfg = load_config(None, {"teacher_tp_size": 4, "teacher_ep_size": 2, "teacher_pp_size": 1,
                             "teacher_dp_size": 2, "teacher_mem_fraction_static": 0.55,
                             "teacher_quantization": "fp8", "enable_sleep": True})
    kw = engine_kwargs(cfg, "/models/t")
    assert kw["tp_size"] == 4 and kw["ep_size"] == 2 and kw["dp_size"] == 2
    assert kw["mem_fraction_static"] == 0.55 and kw["quantization"] == "fp8"
    assert kw["enable_return_hidden_states"] and kw["disable_radix_cache"]
    assert kw["skip_tokenizer_init"] and kw["enable_memory_saver"]
    assert "quantization" not in engine_kwargs(load_config(None, {}), "/m")


def test_sglang_prefill_states_parsing():
    """One block of exactly n rows; the strict cases are in tests/test_gpu_path.py."""
    prefill = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(prefill_states([prefill.tolist()], 4, 3), prefill)  # [[L, d]]
    assert torch.equal(prefill_states([[0.0, 1.0, 2.0]], 1, 3), prefill[:1])  # one flat row


@pytest.mark.gpu
def test_sglang_engine_matches_hf(smollm2_dir, tmp_path):
    pytest.importorskip("sglang")
    from kubedistill.models import load_causal_lm
    from kubedistill.teacher.sglang import SGLangTeacherEngine

    cfg = load_config(None, {"teacher_name_or_path": smollm2_dir, "teacher_tp_size": 1,
                             "teacher_mem_fraction_static": 0.3})
    engine = SGLangTeacherEngine.from_config(cfg, smollm2_dir)
    try:
        seqs = [list(range(200, 240)), list(range(300, 317))]
        positions = [list(range(10, 39)), [0, 5, 16]]
        got = engine.final_states(seqs, positions)
    finally:
        engine.close()
    model = load_causal_lm(smollm2_dir, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for s, p, h in zip(seqs, positions, got, strict=True):
            want = model.model(torch.tensor([s], device="cuda")).last_hidden_state[0, p]
            assert torch.allclose(h, want.float().cpu(), atol=0.1, rtol=0.05)
