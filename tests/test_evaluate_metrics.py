"""Pure metric functions: ROUGE-L, GSM8K number extraction, perplexity, task choice, and the
promotion rule (a pure function of version tags)."""

import math

import pytest

from kubedistill.evaluate import metrics as M
from kubedistill.tracking.registry import decide
from kubedistill.tracking.runs import is_secret_name


def test_rouge_l_hand_computed():
    # c = the cat sat on the mat (6), r = the cat is on the mat (6); LCS = the cat on the mat = 5
    assert M.rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # c = a b c d (4), r = a c (2): LCS 2, P = 1/2, R = 1, F1 = 2/3
    assert M.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # LCS is order-aware: c = b a (2), r = a b (2): LCS 1, P = R = 1/2, F1 = 1/2
    assert M.rouge_l("b a", "a b") == pytest.approx(0.5)
    assert M.rouge_l("", "a b") == 0.0
    assert M.rouge_l("x y", "a b") == 0.0
    assert M.rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)


def test_lcs_length():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert M.lcs_length([], ["a"]) == 0


@pytest.mark.parametrize("text,expected", [
    ("She has 3 apples, then 5 more.\n#### 8", "8"),
    ("#### 1,234", "1234"),
    ("The answer is $1,000.", "1000"),
    ("first 3 then -4.5 at last", "-4.5"),
    ("#### 72 and then 99", "72"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_number(text, expected):
    assert M.extract_number(text) == expected


def test_gsm8k_correct():
    assert M.gsm8k_correct("so the total is 72.", "72")
    assert M.gsm8k_correct("#### 72.0", "72")
    assert M.gsm8k_correct("step 1: 3*4=12\n#### 1,000", "1000")
    assert not M.gsm8k_correct("#### 71", "72")
    assert not M.gsm8k_correct("nothing", "72")
    assert M.gsm8k_correct("answer 5", "Work: 2+3=5\n#### 5")


def test_resolve_task():
    assert M.resolve_task("auto", ["72", "1,000", "3.5", None]) == "gsm8k"
    assert M.resolve_task("auto", ["a cat", "the dog"]) == "rouge"
    assert M.resolve_task("auto", [None, None]) == "rouge"
    assert M.resolve_task("gsm8k", ["a cat"]) == "gsm8k"


def test_perplexity_is_exp_ce():
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(2.5) == pytest.approx(math.exp(2.5))
    assert M.perplexity(1e6) == math.inf


def _tags(version, score, metric="eval_ce", data="h1", higher="False"):
    return {"version": version, "score": str(score), "score_metric": metric,
            "eval_data_hash": data, "higher_is_better": higher}


def test_promotion_rule():
    assert decide(_tags("1", 3.0), None, 0.0) == (True, "first version: no champion yet")
    assert decide(_tags("2", 2.9), _tags("1", 3.0), 0.0)[0]  # lower CE is better
    assert not decide(_tags("2", 3.1), _tags("1", 3.0), 0.0)[0]
    assert not decide(_tags("2", 3.0), _tags("1", 3.0), 0.0)[0]  # a tie does not promote
    assert not decide(_tags("2", 2.95), _tags("1", 3.0), 0.1)[0]  # below min_improvement
    assert decide(_tags("2", 2.85), _tags("1", 3.0), 0.1)[0]
    assert decide(_tags("2", 0.6, "eval_accuracy", higher="True"),
                  _tags("1", 0.5, "eval_accuracy", higher="True"), 0.0)[0]
    ok, why = decide(_tags("2", 1.0), _tags("1", 3.0, metric="eval_kl"), 0.0)
    assert not ok and "metric" in why
    ok, why = decide(_tags("2", 1.0), _tags("1", 3.0, data="h2"), 0.0)
    assert not ok and "different data" in why


def test_secret_names_are_not_params():
    for name in ("hf_token", "aws_secret_access_key", "api_key", "db_password", "token"):
        assert is_secret_name(name)
    for name in ("input_key", "label_key", "max_token_len_per_gpu", "eval_max_new_tokens",
                 "teacher_batch_tokens", "kd_ratio"):
        assert not is_secret_name(name)
