"""VLM teacher-cache benchmark: bytes per cached position and throughput with images against
the same text without images.

    .venv/bin/python benchmarks/vlm_cache.py [--samples 16]

Teacher: ``packaged:smollm2-idefics3-demo`` (SmolLM2-135M-Instruct text weights, a random
4-block SigLIP-B/16-shaped vision tower at 256 px, 16 image tokens per image; built once
into the model cache). Data: the first ``--samples`` rows of ``packaged:captions-train``
(tuxpaint stamps; ``make tuxpaint``), "Describe the picture." -> caption, encoded with the
teacher's processor (``vlm.inputs.encode_sample``). The text variant is the same
conversation with the image part removed. Each variant runs through the real cache-teacher
stage (bf16, one shard); prints one markdown table: teacher tokens, cached positions, shard
bytes per position, positions/s, teacher tokens/s and images/s of the whole stage loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the prepared-data writer of the tests

from _prepared import write_splits  # noqa: E402

from kubedistill.config import load_config  # noqa: E402
from kubedistill.data.demo_vlm import ensure_captions  # noqa: E402
from kubedistill.data.images import attach_images  # noqa: E402
from kubedistill.models.demo_vlm import ensure_demo_vlm  # noqa: E402
from kubedistill.teacher import cache as stage  # noqa: E402
from kubedistill.vlm.inputs import encode_sample  # noqa: E402
from kubedistill.vlm.processing import load_processor  # noqa: E402


def prepared_rows(processor, items: list[dict], base: str, with_images: bool) -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        messages = item["messages"]
        blobs = None
        if with_images:
            with open(os.path.join(base, item["image"]), "rb") as f:
                blobs = [f.read()]
        else:
            messages = [{"role": "user", "content": [p for p in messages[0]["content"]
                                                     if p["type"] == "text"]}, messages[1]]
        sample = attach_images(messages, blobs, base_dir=None, input_field="messages",
                               image_field="image")
        enc = encode_sample(processor, sample.messages, [im.image for im in sample.images])
        rows.append({"id": f"train:{i}", "input_ids": enc.input_ids,
                     "loss_mask": enc.loss_mask, "prompt_len": enc.prompt_len,
                     "response": messages[-1]["content"], "images": blobs,
                     "image_sha256": [hashlib.sha256(b).hexdigest() for b in blobs]
                     if blobs else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    teacher = ensure_demo_vlm()
    train = ensure_captions()["captions-train"]
    with open(train) as f:
        items = [json.loads(line) for line in f][:args.samples]
    processor = load_processor(teacher)
    root = tempfile.mkdtemp(prefix="kd-vlm-bench-")
    table = {}
    for name, with_images in (("with images", True), ("text only", False)):
        rows = prepared_rows(processor, items, os.path.dirname(train), with_images)
        prepared = write_splits(os.path.join(root, name.replace(" ", "_")), {"train": rows})
        cfg = load_config(None, {"teacher_name_or_path": teacher, "prepared_path": prepared,
                                 "teacher_cache_path": prepared + "-cache",
                                 "cache_rows_per_shard": args.samples,
                                 "attn_implementation": "sdpa", "cache_dtype": "bf16"})
        start = time.perf_counter()
        out = stage.cache_teacher(cfg)
        seconds = time.perf_counter() - start
        n_images = sum(len(r["images"] or ()) for r in rows)
        table[name] = (sum(len(r["input_ids"]) for r in rows), out["positions"], out["bytes"],
                       seconds, n_images)
    print(f"\nsmollm2-idefics3-demo teacher, {args.samples} tuxpaint captions, bf16 cache, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs\n")
    print("| variant | teacher tokens | cached positions | bytes/position | positions/s | "
          "teacher tokens/s | images/s |\n|---|---|---|---|---|---|---|")
    for name, (tokens, positions, size, seconds, n_images) in table.items():
        images = f"{n_images / seconds:.2f}" if n_images else "-"
        print(f"| {name} | {tokens:,} | {positions:,} | {size / positions:,.0f} | "
              f"{positions / seconds:,.0f} | {tokens / seconds:,.0f} | {images} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
