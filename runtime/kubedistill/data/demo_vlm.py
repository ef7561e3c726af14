"""Packaged demo caption data with real images: ``packaged:captions-train`` / ``-eval``.

Rows (jsonl, one per image)::

    {"id", "messages": [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": PROMPT}]},
                        {"role": "assistant", "content": CAPTION}],
     "image": "images/<name>.png", "source", "license"}

``image`` is relative to the jsonl file (``data.image_key: image``). Sources, in order:

- **tuxpaint stamps** (Debian ``tuxpaint-stamps-default``, GPL-2, test and demo data only):
  every ``<stem>.png`` with a ``<stem>.txt`` beside it; the caption is the first line of the
  ``.txt`` (English). The PNGs are RGBA, so the loader's white compositing matters. The
  Makefile's ``tuxpaint`` target unpacks the package without root into
  ``.cache/tuxpaint/root``; :func:`stamps_dir` also finds ``$KUBEDISTILL_TUXPAINT_DIR`` or a
  system install under ``/usr/share/tuxpaint/stamps``.
- **photos**: scikit-image's sample photos (BSD-3 / public domain, see its
  ``skimage/data/README.txt``) when the ``scikit-image`` wheel is installed (its data files
  are read through ``importlib.metadata``; the package is never imported), else sklearn's
  ``china.jpg`` / ``flower.jpg``; each with a short hand-written caption.

Each image is stored once, shrunk so its longest side is at most :data:`MAX_SIDE` pixels
(kept RGBA), as ``images/<index>.png``. A seeded permutation puts :data:`EVAL_ROWS` rows in
eval and the rest in train. Everything is materialised once under the data cache
(``captions-demo/``) and rebuilt when the source list or :data:`VERSION` changes;
``provenance.json`` (written last) marks completion.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import json
import os
import random
import shutil
import tempfile

from kubedistill.data.demo import data_cache_dir
from kubedistill.errors import ConfigError

PROMPT = "Describe the picture."
NAMES = ("captions-train", "captions-eval")
EVAL_ROWS = 64
MAX_SIDE = 128
SEED = 20250612
VERSION = 1
STAMPS_SUBDIR = "usr/share/tuxpaint/stamps"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
GPL = "GPL-2.0 (Debian tuxpaint-stamps-default; test and demo data only)"
PHOTO_CAPTIONS = {  # scikit-image sample photos (and the sklearn / matplotlib fallbacks)
    "astronaut.png": "An astronaut in an orange suit in front of a flag.",
    "chelsea.png": "A tabby cat looking up.",
    "coffee.png": "A cup of coffee on a saucer.",
    "rocket.jpg": "A rocket on its launch pad.",
    "motorcycle_left.png": "A motorcycle in a room.",
    "hubble_deep_field.jpg": "Many distant galaxies in a dark sky.",
    "retina.jpg": "A photo of the back of an eye.",
    "coins.png": "Old coins on a dark background.",
    "horse.png": "The silhouette of a horse.",
    "camera.png": "A man with a camera on a tripod.",
    "china.jpg": "A temple with a red roof among trees.",
    "flower.jpg": "A pink flower in close-up.",
}


def stamps_dir() -> str | None:
    """The tuxpaint stamps folder, or None when the package is not unpacked anywhere."""
    for root in (os.environ.get("KUBEDISTILL_TUXPAINT_DIR"),
                 os.path.join(REPO_ROOT, ".cache", "tuxpaint", "root", STAMPS_SUBDIR),
                 os.path.join("/", STAMPS_SUBDIR)):
        if root and os.path.isdir(root):
            return root
    return None


def stamp_pairs(root: str) -> list[tuple[str, str]]:
    """``(png path, caption)`` of every stamp with a non-empty caption, sorted by path."""
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            txt = os.path.join(folder, name[:-4] + ".txt")
            if not name.endswith(".png") or not os.path.exists(txt):
                continue
            with open(txt, encoding="utf-8", errors="replace") as f:
                caption = f.readline().strip()
            if caption:
                out.append((os.path.join(folder, name), caption))
    return sorted(out)


def photo_pairs() -> list[tuple[str, str, str]]:
    """``(path, caption, license)`` of the sample photos that are installed."""
    try:
        dist = md.distribution("scikit-image")
        files = {os.path.basename(str(f)): str(dist.locate_file(f)) for f in dist.files or []
                 if str(f).startswith("skimage/data/")}
        license_ = f"scikit-image=={dist.version} sample data (BSD-3 / public domain)"
    except md.PackageNotFoundError:
        files, license_ = {}, ""
    if not any(name in files for name in PHOTO_CAPTIONS):
        import sklearn

        folder = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
        files = {n: os.path.join(folder, n) for n in ("china.jpg", "flower.jpg")}
        license_ = "scikit-learn sample images (CC BY 2.0, see its datasets/images/README.txt)"
    return [(files[n], c, license_) for n, c in PHOTO_CAPTIONS.items()
            if n in files and os.path.exists(files[n])]


def _sources() -> list[tuple[str, str, str, str]]:
    """``(path, caption, source, license)`` of every image, stamps first."""
    root = stamps_dir()
    stamps = [(p, c, "tuxpaint:" + os.path.relpath(p, root), GPL)
              for p, c in (stamp_pairs(root) if root else [])]
    photos = [(p, c, "photo:" + os.path.basename(p), lic) for p, c, lic in photo_pairs()]
    if not stamps:
        raise ConfigError("the caption demo data needs the tuxpaint stamps: run `make tuxpaint` "
                          "(unpacks Debian's tuxpaint-stamps-default into .cache/tuxpaint) or "
                          "set KUBEDISTILL_TUXPAINT_DIR to a stamps folder")
    return stamps + photos


def shrink_png(path: str, max_side: int = MAX_SIDE) -> bytes:
    """The image at ``path`` as PNG bytes, longest side at most ``max_side`` (mode kept)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode not in ("RGB", "RGBA", "L", "LA"):
            im = im.convert("RGBA")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def _row(index: int, caption: str, source: str, license_: str) -> dict:
    return {"id": f"cap-{index:04d}",
            "messages": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": PROMPT}]},
                         {"role": "assistant", "content": caption}],
            "image": f"images/{index:04d}.png", "source": source, "license": license_}


def ensure_captions(cache_dir: str | None = None) -> dict[str, str]:
    """Materialise the caption demo once; returns ``{name: path}`` for :data:`NAMES`."""
    sources = _sources()
    root = os.path.join(data_cache_dir(cache_dir), "captions-demo")
    paths = {name: os.path.join(root, name.split("-")[1] + ".jsonl") for name in NAMES}
    key = hashlib.sha256(json.dumps([VERSION, MAX_SIDE, EVAL_ROWS, SEED,
                                     [s[1:] for s in sources]]).encode()).hexdigest()
    info_path = os.path.join(root, "provenance.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            if json.load(f).get("key") == key and all(map(os.path.exists, paths.values())):
                return paths
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".captions-")
    os.makedirs(os.path.join(tmp, "images"))
    rows = []
    for i, (path, caption, source, license_) in enumerate(sources):
        with open(os.path.join(tmp, "images", f"{i:04d}.png"), "wb") as f:
            f.write(shrink_png(path))
        rows.append(_row(i, caption, source, license_))
    held = set(random.Random(SEED).sample(range(len(rows)), min(EVAL_ROWS, len(rows) // 4)))
    for name, part in (("captions-train", [r for i, r in enumerate(rows) if i not in held]),
                       ("captions-eval", [r for i, r in enumerate(rows) if i in held])):
        with open(os.path.join(tmp, os.path.basename(paths[name])), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    with open(os.path.join(tmp, "provenance.json"), "w") as f:
        json.dump({"key": key, "version": VERSION, "rows": len(rows), "eval_rows": len(held),
                   "stamps": stamps_dir(), "licenses": sorted({s[3] for s in sources})}, f,
                  indent=2)
    if os.path.exists(root):
        shutil.rmtree(root)
    os.replace(tmp, root)
    return paths
