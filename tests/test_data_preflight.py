"""Tokenizer-pair preflight: normalised vocabularies, reports, the same-vocabulary refusal."""

from __future__ import annotations

import pytest

from kubedistill.data.preflight import (
    check_algorithm,
    embedding_rows,
    normalised_vocab,
    pair_report,
    tokenizer_report,
)
from kubedistill.errors import ConfigError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from kubedistill.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


class FakeSentencePiece:
    """Just enough of a tokenizer for normalised_vocab: a SentencePiece-style vocabulary."""

    backend_tokenizer = None

    def get_vocab(self):
        return {"▁the": 0, "<0x0A>": 1, "ing": 2, "▁Hello": 3}


def test_byte_level_and_sentencepiece_markers_are_unified(tok):
    smol = normalised_vocab(tok)
    assert " the" in smol and "\n" in smol and "Ġthe" not in smol
    sp = normalised_vocab(FakeSentencePiece())
    assert sp == {" the", "\n", "ing", " Hello"}
    assert len(sp & smol) == 4  # every piece exists in SmolLM2's vocabulary once normalised


def test_a_real_sentencepiece_tokenizer_normalises_to_text(tok, sentencepiece_tokenizer_dir):
    """The SentencePiece-style tokenizer built in conftest (``▁`` words, ``<0xNN>`` byte
    fallback): every piece becomes the text it stands for, and those texts are SmolLM2's."""
    from kubedistill.models import load_tokenizer

    sp_tok = load_tokenizer(sentencepiece_tokenizer_dir)
    vocab = sp_tok.get_vocab()
    assert "<0x0A>" in vocab and any(t.startswith("\u2581") for t in vocab)
    sp = normalised_vocab(sp_tok)
    assert not any("\u2581" in t for t in sp)
    assert {" eggs", " the", "\n"} <= sp
    # the normalised text of a piece is what the tokenizer's own decoder makes of it
    anchor = sp_tok.convert_tokens_to_ids("\u2581the")
    for piece, text in (("\u2581eggs", " eggs"), ("\u2581day", " day"), ("<0x0A>", "\n")):
        assert text in sp
        assert sp_tok.decode([anchor, sp_tok.convert_tokens_to_ids(piece)]) == "the" + text
    shared = len(sp & normalised_vocab(tok)) / len(sp)
    assert shared > 0.76, shared  # measured 0.768 (merges such as ".\nShe" are not SmolLM2's)


def test_reports_of_one_tokenizer(tok, smollm2_dir):
    info = tokenizer_report(tok, "smol", smollm2_dir)
    assert info["vocab_size"] == 49152 and embedding_rows(smollm2_dir) == 49152
    assert info["eos_token"] == "<|im_end|>" and info["adds_bos"] is False
    assert len(info["chat_template_hash"]) == 64
    report = pair_report(tok, tok, info, info)
    assert report["same_vocab"] and report["same_tokenizer"] and not report["warnings"]
    check_algorithm(report, "vanilla_kd")  # no error


def test_vanilla_kd_refused_for_different_vocabularies(tok, smollm2_dir):
    info = tokenizer_report(tok, "smol", smollm2_dir)
    other = {**info, "name": "other", "vocab_size": 4, "embedding_rows": 2,
             "chat_template_hash": None}
    report = pair_report(tok, FakeTok(), info, other)
    assert report["same_vocab"] is False and not report["same_chat_template"]
    assert any("embedding rows" in w for w in report["warnings"])
    with pytest.raises(ConfigError, match="simple_ctkd or dskd"):
        check_algorithm(report, "vanilla_kd")
    check_algorithm(report, "dskd")


class FakeTok(FakeSentencePiece):
    bos_token = eos_token = pad_token = None

    def __len__(self):
        return 4
