"""Raw records -> prepared sample rows, with the bad-row report and length counters.

:class:`SampleBuilder` is the per-row part of the prepare stage: it normalises a record
(:mod:`kubedistill.data.chat`), encodes it for the student and, when needed, separately for
the teacher (:mod:`kubedistill.data.masks`), applies the length policy
(:mod:`kubedistill.data.selection`) and returns one row of the prepared schema.

The teacher gets its own tokenization (``teacher_*`` columns) when a teacher takes part and
its tokenizer differs from the student's (vocabulary, chat template, bos/eos handling) or
``teacher_input_key`` gives it a different prompt; otherwise those columns are null and the
teacher reads ``input_ids``. When the vocabularies differ, ``ct_align`` holds the
(student_pos, teacher_pos) alignment of the two tokenizations (:mod:`kubedistill.crosstok`).
With ``length_policy: truncate`` and a shared vocabulary the
teacher keeps as many tokens after its prompt as the student does, so targets stay aligned.

Image-text runs (an image-text student or teacher, or ``image_key`` set) encode chat rows
with each model's own processor instead (:mod:`kubedistill.data.image_rows`): expanded image
tokens, ``images`` (the stored bytes) and ``image_sha256``; a sample over ``max_len`` after
expansion is a ``filtered_too_long`` length event; a bad image is a bad row.

Bad rows: each is reported once as ``{split, source, file, row, id, field, reason}``; with
``on_bad_row: fail`` the first one raises DataError naming file, row and field instead.

Accumulated state (bad rows, length counters, filtered ids, the largest student token id,
alignment counters) can be moved between builders: :meth:`SampleBuilder.export_state` hands
it out (and resets), :meth:`SampleBuilder.merge_state` appends it, so building consecutive
chunks of rows in separate builders and merging their states in chunk order leaves exactly
the state one builder would have after building all of them (:mod:`kubedistill.data.parallel`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import jinja2

from kubedistill.config import Config
from kubedistill.data.chat import RowError, normalise
from kubedistill.data.formats import Record, Source
from kubedistill.data.image_rows import ImageRows
from kubedistill.data.masks import ChatEncoder
from kubedistill.data.preflight import TokenizerPair
from kubedistill.data.selection import LengthFiltered, fit_length
from kubedistill.errors import DataError
from kubedistill.vlm.inputs import ExpandedTooLong

_UNLIMITED = 1 << 62
MAX_LISTED = 100  # filtered ids kept in the manifest


class SampleBuilder:
    def __init__(self, cfg: Config, pair: TokenizerPair):
        self.data = cfg.data
        options = {"apply_chat_template": cfg.data.apply_chat_template,
                   "enable_thinking": cfg.model.enable_thinking,
                   "all_assistant_turns": cfg.data.train_all_assistant_turns}
        self.student = ChatEncoder(pair.student, **options)
        self.teacher: ChatEncoder | None = None
        self.teacher_reason: str | None = None
        self.same_vocab = bool(pair.report and pair.report["same_vocab"])
        if pair.teacher is not None:
            if not pair.report["same_tokenizer"]:
                self.teacher_reason = "the teacher's tokenizer or chat template differs"
            elif cfg.data.teacher_input_key:
                self.teacher_reason = "teacher_input_key gives the teacher its own prompt"
            if self.teacher_reason:
                self.teacher = (self.student if pair.teacher is pair.student
                                else ChatEncoder(pair.teacher, **options))
        self.image_rows = ImageRows.for_run(cfg, pair, self.teacher_reason)
        if self.image_rows is not None and self.image_rows.teacher is not None:
            self.teacher_reason = self.image_rows.teacher_reason
        self._reset_state()
        # cross-tokenizer alignment (different vocabularies): token byte tables of both sides
        self.ct_tables = None
        if self.teacher is not None and pair.teacher is not None and not self.same_vocab:
            from kubedistill.crosstok.vocab import token_table

            self.ct_tables = (token_table(pair.student), token_table(pair.teacher))

    @property
    def teacher_tokenization(self) -> bool:
        """Whether the teacher gets its own columns (its tokenizer or processor differs)."""
        return self.teacher is not None or bool(self.image_rows and self.image_rows.teacher)

    # ---- accumulated state ---------------------------------------------------------------
    def _reset_state(self) -> None:
        self.bad: list[dict[str, Any]] = []
        self.length: dict[str, Counter] = {"train": Counter(), "eval": Counter()}
        self.filtered_ids: list[str] = []
        self.max_student_id = -1
        self.ct_counts: dict[str, Counter] = {"train": Counter(), "eval": Counter()}

    def export_state(self) -> dict[str, Any]:
        """The accumulated state (picklable), handed over: this builder starts afresh."""
        state = {"bad": self.bad, "length": self.length, "filtered_ids": self.filtered_ids,
                 "max_student_id": self.max_student_id, "ct_counts": self.ct_counts}
        self._reset_state()
        return state

    def merge_state(self, state: dict[str, Any]) -> None:
        """Append ``state`` (from :meth:`export_state` of a builder that built the rows
        after this one's) as if this builder had built those rows itself: bad rows in
        order, counters added (keys in first-seen order), filtered ids up to MAX_LISTED."""
        self.bad.extend(state["bad"])
        for mine, theirs in ((self.length, state["length"]), (self.ct_counts, state["ct_counts"])):
            for split, counts in theirs.items():
                mine.setdefault(split, Counter()).update(counts)
        room = max(0, MAX_LISTED - len(self.filtered_ids))
        self.filtered_ids.extend(state["filtered_ids"][:room])
        self.max_student_id = max(self.max_student_id, state["max_student_id"])

    # ---- bad rows ----------------------------------------------------------------------
    def report_bad(self, source: Source, record: Record, field: str | None, reason: str,
                   split: str) -> None:
        entry = {"split": split, "source": source.name, "file": record.file, "row": record.row,
                 "id": source.row_id(record), "field": field, "reason": reason}
        if self.data.on_bad_row == "fail":
            where = f", field '{field}'" if field else ""
            raise DataError(f"{record.file} row {record.row}{where}: {reason} "
                            "(on_bad_row: fail; 'skip' drops and reports bad rows)")
        self.bad.append(entry)

    def report_read_errors(self, source: Source, split: str) -> None:
        for record in source.records:
            if record.error is not None:
                self.report_bad(source, record, None, record.error, split)

    # ---- one row -----------------------------------------------------------------------
    def build(self, source: Source, record: Record, split: str,
              suffix: str = "") -> dict[str, Any] | None:
        """The prepared row of ``record``, or None (reported as bad or length-filtered)."""
        sample_id = source.row_id(record) + suffix
        images = hashes = None
        row = record.data or {}
        try:
            conv = normalise(row, self.data, images=self.image_rows is not None)
            if self.image_rows is not None and conv.messages is not None:
                encoded = self.image_rows.encode(conv, row, record.file)
                enc, t_enc = encoded.student, encoded.teacher
                images, hashes = encoded.images, encoded.sha256
            else:
                if self.data.image_key and row.get(self.data.image_key) is not None:
                    raise RowError(self.data.image_key, "images need a conversation (a "
                                   "messages list or a prompt/response pair), not plain text")
                enc = self.student.encode(conv)
                t_enc = self.teacher.encode(conv, conv.teacher_messages) if self.teacher \
                    else None
        except ExpandedTooLong:
            self._filtered(split, "filtered_too_long", sample_id)
            return None
        except RowError as exc:
            self.report_bad(source, record, exc.field, exc.reason, split)
            return None
        except jinja2.TemplateError as exc:
            self.report_bad(source, record, self.data.input_key,
                            f"chat template error: {exc}", split)
            return None
        events: list[str] = []
        d = self.data
        try:
            ids, mask, plen = fit_length(enc.input_ids, enc.loss_mask, enc.prompt_len,
                                         max_len=d.max_len, prompt_max_len=d.prompt_max_len,
                                         policy=d.length_policy, events=events)
            t_ids = t_mask = t_plen = None
            if t_enc is not None:
                t_ids, t_mask, t_plen = fit_length(
                    t_enc.input_ids, t_enc.loss_mask, t_enc.prompt_len, max_len=_UNLIMITED,
                    prompt_max_len=d.prompt_max_len, policy=d.length_policy, events=events)
                limit = d.max_len
                if self.same_vocab and d.length_policy == "truncate":
                    limit = t_plen + len(ids) - plen
                t_ids, t_mask, t_plen = fit_length(
                    t_ids, t_mask, t_plen, max_len=limit, prompt_max_len=_UNLIMITED,
                    policy=d.length_policy, events=events)
        except LengthFiltered as exc:
            self._filtered(split, exc.reason, sample_id)
            return None
        for event in dict.fromkeys(events):  # once each, in order (deterministic key order)
            self.length[split][event] += 1
        self.length[split]["kept"] += 1
        self.max_student_id = max(self.max_student_id, max(ids))
        ct_align = None
        if self.ct_tables is not None and t_ids is not None:
            from kubedistill.crosstok.align import align_pairs, flatten_pairs

            pairs = align_pairs(ids, t_ids, *self.ct_tables, mask, t_mask)
            ct_align = flatten_pairs(pairs)
            self.ct_counts[split]["aligned"] += len(pairs)
            self.ct_counts[split]["loss_tokens"] += int(sum(mask[1:]))
        return {"id": sample_id, "input_ids": ids, "loss_mask": mask, "prompt_len": plen,
                "teacher_input_ids": t_ids, "teacher_loss_mask": t_mask,
                "teacher_prompt_len": t_plen, "response": conv.response, "label": conv.label,
                "images": images, "image_sha256": hashes, "ct_align": ct_align}

    def _filtered(self, split: str, reason: str, sample_id: str) -> None:
        self.length[split][reason] += 1
        if len(self.filtered_ids) < MAX_LISTED:
            self.filtered_ids.append(sample_id)

