"""Loss and eval curves as PNG (matplotlib, Agg backend) from step records.

A record is a dict ``{"step": int, "<metric>": number, ...}`` (the train log jsonl has one per
line); non-numeric fields are ignored. One panel per metric, x = step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from kubedistill import storage

MAX_PANELS = 16


def read_records(uri: str) -> list[dict]:
    """The records of a jsonl file (blank or broken lines skipped)."""
    out = []
    for line in storage.read_bytes(uri).decode().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def curves(records: Iterable[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (steps, values), in record order; records without a step are skipped."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return out


def plot_curves(records: Iterable[dict], out_path: str, title: str = "") -> str | None:
    """Write a PNG grid of the curves in ``records`` to ``out_path``; None if nothing to plot."""
    data = {k: v for k, v in curves(records).items() if len(v[0]) >= 1}
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = sorted(data, key=lambda k: (not k.endswith("loss"), k))[:MAX_PANELS]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs, ys = data[key]
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
