"""Loss masks on the real SmolLM2 tokenizer (ChatML): exactly the assistant tokens + <|im_end|>
of the last assistant turn (KDFlow's target), or of every one with all_assistant_turns."""

from __future__ import annotations

import pytest

from kubedistill.config import DataConfig
from kubedistill.data.chat import Conversation, RowError, normalise
from kubedistill.data.masks import ChatEncoder


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from kubedistill.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def targets(tok, enc) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, m in zip(enc.input_ids, enc.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                   for i, t in enumerate(turns)]


def test_default_system_prompt_is_rendered_and_not_a_target(tok):
    enc = ChatEncoder(tok).encode(Conversation(messages=chat("What is 2+2?", "4")))
    prompt = tok.decode(enc.input_ids[:enc.prompt_len])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert targets(tok, enc) == ["4<|im_end|>"]
    assert enc.loss_mask[0] == 0 and enc.loss_mask[enc.prompt_len] == 1
    # everything after the last target is the trailing newline, not a target
    last = max(i for i, m in enumerate(enc.loss_mask) if m)
    assert tok.decode(enc.input_ids[last + 1:]) == "\n"


def kdflow_response(tok, msgs) -> str:
    """KDFlow's target text (kdflow/datasets/sft_dataset.py): the render of the whole
    conversation after the prompt ``msgs[:-1]`` + generation prompt, right-stripped, with
    ``" " + eos`` appended when it does not end with the eos token."""
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    response = full[len(prompt):].removeprefix("<think>\n\n</think>\n\n").rstrip()
    return response if response.endswith(tok.eos_token) else response + " " + tok.eos_token


ANSWERS = ["Hello! How can I help?", "Paris.", "Roughly 2.1 million people\nlive there."]


def multi_turn(system=None):
    return chat("Hi", ANSWERS[0], "Capital of France?", ANSWERS[1], "Population?", ANSWERS[2],
                system=system)


@pytest.mark.parametrize("system", [None, "You answer in one word."])
def test_multi_turn_masks_the_last_assistant_turn_as_kdflow(tok, system):
    msgs = multi_turn(system)
    enc = ChatEncoder(tok).encode(Conversation(messages=msgs))
    assert targets(tok, enc) == [ANSWERS[-1] + "<|im_end|>"] == [kdflow_response(tok, msgs)]
    # the tokens equal what apply_chat_template itself produces
    reference = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(reference)
    # the prompt is everything before the last reply, ending with the assistant header
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(enc.input_ids[:enc.prompt_len]) == prompt


@pytest.mark.parametrize("system", [None, "You answer in one word."])
def test_all_assistant_turns_flag_masks_every_assistant_turn(tok, system):
    msgs = multi_turn(system)
    enc = ChatEncoder(tok, all_assistant_turns=True).encode(Conversation(messages=msgs))
    assert targets(tok, enc) == [a + "<|im_end|>" for a in ANSWERS]
    assert len(enc.input_ids) == len(enc.loss_mask)
    # nothing of the headers is a target
    masked = [i for i, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m]
    assert tok.convert_tokens_to_ids("<|im_start|>") not in masked
    assert masked.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(ANSWERS)
    without = ChatEncoder(tok, apply_chat_template=False, all_assistant_turns=True).encode(
        Conversation(messages=msgs))
    assert targets(tok, without) == [a + "<|im_end|>" for a in ANSWERS]
    last_only = ChatEncoder(tok, apply_chat_template=False).encode(Conversation(messages=msgs))
    assert targets(tok, last_only) == [ANSWERS[-1] + "<|im_end|>"]


def test_response_that_repeats_the_prompt_is_found_at_the_right_place(tok):
    # the assistant text also occurs in the user turn; the mask must cover the reply only
    msgs = chat("Say exactly: yes", "yes", "Again: yes", "yes")
    enc = ChatEncoder(tok, all_assistant_turns=True).encode(Conversation(messages=msgs))
    assert targets(tok, enc) == ["yes<|im_end|>", "yes<|im_end|>"]
    last = ChatEncoder(tok).encode(Conversation(messages=msgs))
    assert targets(tok, last) == ["yes<|im_end|>"]
    assert last.loss_mask[-3:] == [1, 1, 0] and tok.decode(last.input_ids[-3:]) == \
        "yes<|im_end|>\n"


def test_offsets_and_segment_paths_agree(tok):
    msgs = chat("Hi", "Hello there, friend.", "2*3?", "6")
    fast = ChatEncoder(tok)
    slow = ChatEncoder(tok)
    slow.has_offsets = False  # the path taken by tokenizers without offsets
    a, b = fast.encode(Conversation(messages=msgs)), slow.encode(Conversation(messages=msgs))
    assert (a.input_ids, a.loss_mask, a.prompt_len) == (b.input_ids, b.loss_mask, b.prompt_len)


def test_without_template_concatenates_and_targets_response_plus_eos(tok):
    enc = ChatEncoder(tok, apply_chat_template=False).encode(
        Conversation(messages=chat("Q: 1+1?", "2")))
    assert tok.decode(enc.input_ids) == "Q: 1+1?\n2<|im_end|>"
    assert targets(tok, enc) == ["2<|im_end|>"]


def test_plain_text_targets_every_token_but_the_first(tok):
    data = DataConfig(input_key="text", output_key=None)
    conv = normalise({"text": "The cat sat on the mat."}, data)
    enc = ChatEncoder(tok).encode(conv)
    assert conv.messages is None and conv.response == ""
    assert enc.loss_mask == [0] + [1] * (len(enc.input_ids) - 1)
    assert enc.prompt_len == 1
    assert tok.decode(enc.input_ids) == "The cat sat on the mat.<|im_end|>"


def test_enable_thinking_is_passed_only_to_templates_that_use_it(tok):
    assert "enable_thinking" not in ChatEncoder(tok, enable_thinking=True).template_kwargs

    class Thinking:
        """A template that reacts to enable_thinking (like Qwen3's)."""

        chat_template = "{{ enable_thinking }}"

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

    assert ChatEncoder(Thinking(), enable_thinking=True).template_kwargs == {
        "enable_thinking": True}


def test_template_that_rewrites_the_reply_is_a_row_error(tok):
    class Upper:
        chat_template = "x"

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

        def apply_chat_template(self, messages, **kw):
            return "".join(m["content"].upper() + "\n" for m in messages)

    with pytest.raises(RowError, match="verbatim"):
        ChatEncoder(Upper()).encode(Conversation(messages=chat("hi", "hello")))


def test_tokenizer_without_template_falls_back_to_concatenation(tok):
    class NoTemplate:
        chat_template = None

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

    enc = ChatEncoder(NoTemplate())
    assert not enc.use_template
    out = enc.encode(Conversation(messages=chat("Hi", "Yo", "Bye", "Ciao")))
    assert tok.decode(out.input_ids) == "Hi\nYo<|im_end|>Bye\nCiao<|im_end|>"
    assert targets(tok, out) == ["Ciao<|im_end|>"]
