"""Tests for loralab.metrics, with hand-computed expected values."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from loralab.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    MultilingualTokenizer,
    bleu,
    bleu_tokenizer_for,
    chrf,
    contains_cjk,
    exact_match,
    normalize_text,
    rouge_l,
    score_corpus,
    score_pair,
)

# --- normalize_text / exact_match -----------------------------------------


def test_normalize_text_collapses_whitespace() -> None:
    assert normalize_text("  The  cat\n\tsat \r\n") == "The cat sat"
    assert normalize_text("") == ""


def test_exact_match_ignores_whitespace_differences() -> None:
    assert exact_match(["  The  cat\n"], ["The cat"]) == 1.0


def test_exact_match_mixed_list() -> None:
    # 1 hit ("a b" ~ "a  b") out of 2 -> 0.5; case is significant.
    assert exact_match(["a  b", "Dog"], ["a b", "dog"]) == 0.5


def test_exact_match_empty_and_mismatch() -> None:
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


# --- exact match of JSON answers ------------------------------------------------


@pytest.mark.parametrize(("prediction", "reference"), [
    ('{"name": "Ada", "age": 36}', '{"age":36,"name":"Ada"}'),  # key order and spacing
    ('```json\n{"name": "Ada",\n "tags": ["a", "b"]}\n```', '{"name": "Ada", "tags": ["a", "b"]}'),  # a fence
    ('```\n[1, 2.0, null]\n```', '[1.0, 2, null]'),  # 1 and 1.0 are the same JSON number
    ('{"a": {"b": [true, "x"]}}', ' {"a":{"b":[true,"x"]}} '),
])
def test_exact_match_compares_json_by_value(prediction: str, reference: str) -> None:
    assert exact_match([prediction], [reference]) == 1.0
    assert score_pair(prediction, reference)["exact_match"] == 1.0


@pytest.mark.parametrize(("prediction", "reference"), [
    ('{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 37}'),  # a different value
    ('{"name": "Ada"}', '{"name": "Ada", "age": 36}'),  # a missing key
    ('{"ok": true}', '{"ok": 1}'),  # true is not 1
    ('["a", "b"]', '["b", "a"]'),  # arrays keep their order
    ('{"x": NaN}', '{"x":  NaN}'),  # NaN is not JSON: compared as text (equal after whitespace)
    ('{"x": NaN}', '{"x":NaN}'),  # ... and here the texts differ
    ('{"name": "Ada"', '{"name": "Ada"}'),  # truncated: not JSON, text differs
    ('"Ada"', 'Ada'),  # JSON strings are not objects / arrays: text match
])
def test_exact_match_json_mismatches(prediction: str, reference: str) -> None:
    expected = float(normalize_text(prediction) == normalize_text(reference))
    assert exact_match([prediction], [reference]) == expected
    assert score_pair(prediction, reference)["exact_match"] == expected


def test_exact_match_json_only_when_both_sides_parse() -> None:
    # a JSON answer against a plain-text reference (and the reverse) is today's text match
    assert exact_match(['{"a": 1}', "{'a': 1}"], ['{"a":1} extra', "{'a':  1}"]) == 0.5  # Python's quotes: text
    assert exact_match(['{"a":  1}'], ['{"a":  1}']) == 1.0
    assert exact_match(["x" * 3 + "[" * 100000], ["[" * 100000]) == 0.0  # nested too deep: no crash


# --- contains_cjk / tokenizer ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("我喜欢猫", True),  # Han
        ("ねこ", True),  # Hiragana
        ("カタカナ", True),  # Katakana
        ("한국어", True),  # Hangul
        ("ＡＢＣ", True),  # fullwidth forms
        ("hello café", False),
        ("สวัสดี", False),  # Thai is not CJK
        ("", False),
    ],
)
def test_contains_cjk(text: str, expected: bool) -> None:
    assert contains_cjk(text) is expected


def test_tokenizer_splits_cjk_and_keeps_unicode_words() -> None:
    tok = MultilingualTokenizer()
    assert tok.tokenize("The Café, naïve!") == ["the", "café", "naïve"]
    assert tok.tokenize("我喜欢猫") == ["我", "喜", "欢", "猫"]
    assert tok.tokenize("abc中文def") == ["abc", "中", "文", "def"]
    assert tok.tokenize("한국어") == ["한", "국", "어"]
    assert tok.tokenize("ＡＢＣ") == ["abc"]  # NFKC folds fullwidth Latin


# --- ROUGE-L ----------------------------------------------------------------


def test_rouge_l_english_by_hand() -> None:
    # pred: the cat sat on the mat (6 tokens)
    # ref:  the cat lay on the mat (6 tokens)
    # LCS = "the cat on the mat" = 5
    # P = 5/6, R = 5/6, F1 = 2PR/(P+R) = 5/6 = 0.8333
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)


def test_rouge_l_is_case_insensitive_and_averages() -> None:
    # pair 1: identical after lowercasing -> 1.0; pair 2: disjoint -> 0.0
    assert rouge_l(["The CAT", "dog"], ["the cat", "bird"]) == pytest.approx(0.5)


def test_rouge_l_chinese_by_characters() -> None:
    # chars: 我 喜 欢 猫 vs 我 喜 欢 狗 -> LCS 3, P = R = 3/4, F1 = 0.75
    pred, ref = "我喜欢猫", "我喜欢狗"
    assert rouge_l([pred], [ref]) == pytest.approx(0.75)
    # The default rouge_score tokenizer drops non-ASCII and gives 0 here.
    default = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert default == 0.0


def test_rouge_l_japanese_kana() -> None:
    # ね こ が す き vs い ぬ が す き -> LCS "がすき" = 3, P = R = 3/5, F1 = 0.6
    assert rouge_l(["ねこがすき"], ["いぬがすき"]) == pytest.approx(0.6)


def test_rouge_l_mixed_script() -> None:
    # [i, love, 東, 京, タ, ワ, ー] vs [i, love, 京, 都, タ, ワ, ー]
    # LCS = i love 京 タ ワ ー = 6, P = R = 6/7, F1 = 6/7
    assert rouge_l(["I love 東京タワー"], ["I love 京都タワー"]) == pytest.approx(6 / 7)


def test_rouge_l_accented_latin() -> None:
    # [café, crème] vs [café, noir] -> LCS 1, P = R = 1/2, F1 = 0.5
    assert rouge_l(["café crème"], ["café noir"]) == pytest.approx(0.5)


def test_rouge_l_empty_cases() -> None:
    assert rouge_l(["", "  "], ["", "\n"]) == 1.0  # both empty -> 1.0
    assert rouge_l([""], ["cat"]) == 0.0  # one empty -> 0.0
    assert rouge_l(["cat"], [""]) == 0.0
    assert rouge_l([], []) == 0.0
    with pytest.raises(ValueError):
        rouge_l(["a", "b"], ["a"])


# --- chrF ----------------------------------------------------------------------


def test_chrf_identical_and_disjoint() -> None:
    same = "the cat sat on the mat"
    assert chrf([same], [same]) == pytest.approx(100.0)
    assert chrf(["xyz qvw"], ["abc def"]) < 5
    assert chrf([], []) == 0.0


# --- BLEU ----------------------------------------------------------------------


def test_bleu_tokenizer_choice() -> None:
    assert bleu_tokenizer_for(["the cat"]) == "13a"
    assert bleu_tokenizer_for(["我喜欢猫"]) == "zh"
    assert bleu_tokenizer_for(["東京へ行く"]) == "char"  # kana -> Japanese
    assert bleu_tokenizer_for(["한국어"]) == "char"
    assert bleu_tokenizer_for(["ＡＢＣ"]) == "char"
    assert bleu_tokenizer_for([]) == "13a"


def test_bleu_identical() -> None:
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_bleu_chinese_identical_with_zh_tokenizer() -> None:
    # Without "zh" (13a) each sentence is one token; with it, one per char.
    assert bleu(["我喜欢吃苹果"], ["我喜欢吃苹果"]) == pytest.approx(100.0)
    # 我喜欢吃苹果 vs 我喜欢吃香蕉 (6 chars, BP = 1): n-gram precisions
    # 4/6, 3/5, 2/4, 1/3 -> BLEU = 100 * (1/15) ** (1/4) = 50.81 (13a: 0).
    assert bleu(["我喜欢吃苹果"], ["我喜欢吃香蕉"]) == pytest.approx(100 * (1 / 15) ** 0.25)


def test_bleu_japanese_identical_with_char_tokenizer() -> None:
    assert bleu(["ねこがすきです"], ["ねこがすきです"]) == pytest.approx(100.0)


def test_bleu_edge_cases_never_raise() -> None:
    assert bleu([], []) == 0.0
    assert bleu([""], [""]) == 0.0
    assert bleu([""], ["the cat"]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        bleu(["a"], ["a", "b"])


# --- score_pair / score_corpus -------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("the cat sat on the mat", "the cat lay on the mat"),
        ("我喜欢猫", "我喜欢狗"),
        ("", ""),
        ("", "cat"),
    ],
)
def test_score_pair_keys_and_ranges(pred: str, ref: str) -> None:
    scores = score_pair(pred, ref)
    assert set(scores) == set(METRIC_NAMES)
    assert 0.0 <= scores["exact_match"] <= 1.0
    assert 0.0 <= scores["rouge_l"] <= 1.0
    assert 0.0 <= scores["chrf"] <= 100.0 + 1e-9
    assert 0.0 <= scores["bleu"] <= 100.0 + 1e-9


def test_score_pair_values() -> None:
    scores = score_pair("the cat sat on the mat", "the cat sat on the mat")
    assert scores["exact_match"] == 1.0
    assert scores["rouge_l"] == 1.0
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["bleu"] == pytest.approx(100.0)
    # Sentence BLEU with effective_order: short partial match is still > 0.
    assert score_pair("the cat", "the dog")["bleu"] > 0
    assert score_pair("我喜欢猫", "我喜欢狗")["rouge_l"] == pytest.approx(0.75)


def test_score_corpus() -> None:
    preds = ["the cat sat on the mat", "hello world"]
    refs = ["the cat lay on the mat", "hello  world"]
    scores = score_corpus(preds, refs)
    assert set(scores) == {*METRIC_NAMES, "n"}
    assert scores["n"] == 2
    assert scores["exact_match"] == 0.5
    assert scores["rouge_l"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert 0.0 < scores["chrf"] < 100.0
    assert 0.0 < scores["bleu"] < 100.0


def test_score_corpus_empty_and_mismatch() -> None:
    zeros = {"exact_match": 0.0, "rouge_l": 0.0, "chrf": 0.0, "bleu": 0.0, "n": 0}
    assert score_corpus([], []) == zeros
    with pytest.raises(ValueError, match="same length"):
        score_corpus(["a"], [])


def test_metric_directions() -> None:
    assert METRIC_NAMES == ("exact_match", "rouge_l", "chrf", "bleu")
    assert all(HIGHER_IS_BETTER[name] for name in METRIC_NAMES)
    assert HIGHER_IS_BETTER["eval_loss"] is False
