"""Data: raw-format readers, chat normalisation, chat templates + loss masks, the tokenizer
pair preflight, the packaged demo dataset, the ``prepare`` stage and the prepared reader.

Entry points: :func:`kubedistill.data.prepare.prepare` (the stage),
:func:`kubedistill.data.prepared.load_split` / :func:`~kubedistill.data.prepared.read_manifest`
(readers for the stages after it). The format of a prepared dataset is in docs/contracts.md.
"""
