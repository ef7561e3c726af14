"""Image-text rows for ``prepare``: each model's own processor, images attached and expanded.

A run is an **image-text run** when the student (or the teacher) is an image-text model
(:func:`kubedistill.vlm.model.is_image_text`) or ``data.image_key`` is set;
:meth:`ImageRows.for_run` returns None for every other run, whose rows stay exactly as
before. In an image-text run a chat row is

1. normalised with image content parts kept (:func:`kubedistill.data.chat.normalise`);
2. given its images: ``row[image_key]``, OpenAI image parts and ``<image>`` placeholders,
   in order (:func:`kubedistill.data.images.attach_images`; relative paths are relative to
   the folder of the row's dataset file; more than ``data.max_image_pixels`` pixels is bad);
3. encoded by :func:`kubedistill.vlm.inputs.encode_sample` with the STUDENT's processor
   (:func:`kubedistill.vlm.processing.load_processor`): ``input_ids`` hold the expanded image
   tokens and ``loss_mask`` never covers image or marker tokens; and again with the
   TEACHER's processor when its tokenizer or processor config differs
   (``teacher_*`` columns), so each side expands with its own processor.

A sample longer than ``max_len`` after expansion raises
:class:`~kubedistill.vlm.inputs.ExpandedTooLong` (a ``filtered_too_long`` length event,
never a cut: cutting inside an image block breaks the image-token count). A row without
images (text only) goes through the same processors with no pixels; plain-text rows (no
conversation) keep the text encoder.

Refused with a ConfigError that says why (checked once, before any row):
``image_key`` or an image-text teacher with a text-only student; an image-text student with
a text-only teacher; a pair with different vocabularies (cross-tokenizer alignment does not
handle image blocks yet); ``length_policy: truncate``; ``apply_chat_template: false``;
``train_all_assistant_turns``; ``teacher_input_key``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from kubedistill.config import Config
from kubedistill.data.chat import Conversation, RowError
from kubedistill.data.images import ImageLimits, attach_images
from kubedistill.data.masks import Encoded
from kubedistill.errors import ConfigError


def processor_hash(processor) -> str:
    """sha256 of the processor's JSON configuration (``ImageTextProcessor.config()``)."""
    blob = json.dumps(processor.config(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ImageRow:
    """One row's encodings (teacher None when it reads the student's) and its images."""

    student: Encoded
    teacher: Encoded | None
    images: list[bytes] | None
    sha256: list[str] | None


class ImageRows:
    """The processors of an image-text run and the row encoding of the module docstring."""

    def __init__(self, cfg: Config, student, teacher, teacher_reason: str | None):
        self.data = cfg.data
        self.student = student
        self.teacher = teacher  # None: the teacher reads the student's columns
        self.teacher_reason = teacher_reason
        self.limits = ImageLimits(int(cfg.data.max_image_pixels))
        self.student_hash = processor_hash(student)
        self.teacher_hash = processor_hash(teacher) if teacher is not None else None

    @classmethod
    def for_run(cls, cfg: Config, pair, teacher_reason: str | None) -> ImageRows | None:
        """The image path of this run, or None for a text run (see the module docstring).
        ``teacher_reason``: why the text path would give the teacher its own tokens."""
        from kubedistill.vlm.model import is_image_text
        from kubedistill.vlm.processing import load_processor

        d = cfg.data
        student_vlm = is_image_text(pair.student_dir)
        teacher_vlm = pair.teacher_dir is not None and is_image_text(pair.teacher_dir)
        if not (student_vlm or teacher_vlm or d.image_key):
            return None
        if not student_vlm:
            why = f"image_key '{d.image_key}' is set" if d.image_key else \
                f"the teacher {pair.teacher_ref} is an image-text model"
            raise ConfigError(f"{why}, but the student {pair.student_ref} is a text-only model "
                              "(its config.json has no vision_config); use an image-text "
                              "student or drop image_key")
        if pair.teacher is not None and not teacher_vlm:
            raise ConfigError(f"the student {pair.student_ref} is an image-text model but the "
                              f"teacher {pair.teacher_ref} is text-only; it cannot see the "
                              "images (use an image-text teacher, or kd_algorithm: sft)")
        if pair.teacher is not None and not pair.report["same_vocab"]:
            raise ConfigError(
                f"the image-text pair {pair.student_ref} / {pair.teacher_ref} has different "
                "vocabularies: cross-tokenizer alignment does not handle image blocks yet "
                "(the two processors expand images to different token runs); use a teacher "
                "that shares the student's tokenizer")
        for bad, reason in (
                (d.length_policy == "truncate", "length_policy: truncate (cutting an expanded "
                 "sample can split an image block; use length_policy: filter)"),
                (not d.apply_chat_template, "apply_chat_template: false (the processor's chat "
                 "template places the image tokens)"),
                (d.train_all_assistant_turns, "train_all_assistant_turns (only the final "
                 "assistant reply is a target with images)"),
                (bool(d.teacher_input_key), "teacher_input_key (the teacher reads the "
                 "student's conversation and images)")):
            if bad:
                raise ConfigError(f"image-text data does not support {reason}")
        trust = cfg.model.trust_remote_code
        student = load_processor(pair.student_dir, trust_remote_code=trust)
        teacher = None
        if pair.teacher is not None:
            same_dir = os.path.realpath(pair.teacher_dir) == os.path.realpath(pair.student_dir)
            teacher = student if same_dir else load_processor(pair.teacher_dir,
                                                              trust_remote_code=trust)
            if teacher is not student and processor_hash(teacher) != processor_hash(student):
                teacher_reason = teacher_reason or "the teacher's image processor differs"
            if not teacher_reason:
                teacher = None
        return cls(cfg, student, teacher, teacher_reason if teacher is not None else None)

    def fingerprint(self) -> dict[str, str]:
        """The processors' config hashes, for the prepare fingerprint and manifest."""
        out = {"student_processor": self.student_hash}
        if self.teacher_hash is not None:
            out["teacher_processor"] = self.teacher_hash
        return out

    def encode(self, conv: Conversation, row: dict[str, Any], file: str) -> ImageRow:
        """Encode one chat row (see the module docstring); raises RowError for a bad row,
        ExpandedTooLong for a too-long one."""
        from kubedistill.vlm.inputs import encode_sample

        d = self.data
        sample = attach_images(conv.messages, row.get(d.image_key) if d.image_key else None,
                               base_dir=_folder(file), input_field=d.input_key,
                               image_field=d.image_key, limits=self.limits)
        pil = [im.image for im in sample.images]
        encodings = []
        for processor in (self.student, self.teacher):
            if processor is None:
                encodings.append(None)
                continue
            try:
                enc = encode_sample(processor, sample.messages, pil, max_len=d.max_len,
                                    field=d.input_key)
            except ValueError as exc:  # the processor refused the images (size, count)
                raise RowError(d.image_key or d.input_key,
                               f"the processor cannot encode the images: {exc}") from exc
            encodings.append(Encoded(enc.input_ids, enc.loss_mask, enc.prompt_len))
        return ImageRow(encodings[0], encodings[1], [im.data for im in sample.images] or None,
                        sample.hashes or None)


def _folder(file: str) -> str | None:
    """The folder of a dataset file (a local path or a URI), for relative image paths."""
    if not file:
        return None
    head = file.rsplit("/", 1)[0] if "/" in file else ""
    return head or None
