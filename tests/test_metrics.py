"""Metrics against values worked out by hand (and one published by the Q-BLEU authors)."""

import math
import unicodedata

import pytest

from latentrag.errors import LatentRagError
from latentrag.evaluation.metrics import (
    answer_recall_at_k,
    bleu,
    distinct_n,
    dpr_tokens,
    exact_match,
    has_answer,
    label_accuracy,
    normalize_answer,
    q_bleu,
    q_bleu1,
    regex_match,
    rouge_l,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),
        ("an apple", "apple"),
        ("A dog, the cat & an owl.", "dog cat owl"),
        ("theater anthem", "theater anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("  ", ""),
    ],
)
def test_normalize_answer_is_squad_v11(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_normalises_and_takes_the_best_gold():
    assert exact_match("The Cat", ["cat"]) == 1.0
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("Paris France", "Paris") == 0.0
    assert exact_match("Paris", "Paris") == 1.0


def test_token_f1_hand_computed():
    # pred tokens {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", ["cat sat down"]) == pytest.approx(0.8)
    # pred {cat}, gold {cat, cat}: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("cat", "cat cat") == pytest.approx(2 / 3)
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("the cat sat", ["dog", "cat sat down", "The cat sat."]) == 1.0
    assert token_f1("", ["the"]) == 0.0  # both normalise to empty: SQuAD v1.1 scores 0


def test_no_golds_is_an_error():
    with pytest.raises(LatentRagError, match="no gold answers"):
        exact_match("x", [])
    with pytest.raises(LatentRagError, match="no gold answers"):
        token_f1("x", [])


def test_regex_match_is_anchored_case_insensitive_and_tolerates_bad_patterns():
    assert regex_match("20 Feet", [r"20\s*f(ee|oo)t"]) == 1.0
    assert regex_match("about 20 feet", r"20\s*feet") == 0.0  # DrQA uses re.match: anchored at the start
    assert regex_match("Kansas", ["([", "kan.*"]) == 1.0  # the invalid pattern counts as no match
    assert regex_match("Kansas", "([") == 0.0


def test_dpr_tokens_split_alnum_runs_and_single_symbols():
    assert dpr_tokens("Paris, France's 1,000") == ["paris", ",", "france", "'", "s", "1", ",", "000"]


def test_has_answer_matches_whole_tokens_only():
    assert has_answer("Paris, France", ["Paris"])
    assert not has_answer("Paris, France", ["Par"])
    assert has_answer("He moved to NEW YORK city.", ["new york"])
    assert not has_answer("Paris, France", ["paris france"])  # the comma is a token in between
    assert has_answer("Paris, France", ["Lyon", "france"])
    assert not has_answer("Paris", [""])


def test_has_answer_is_unicode_normalisation_blind():
    nfd_text = unicodedata.normalize("NFD", "Wilhelm Röntgen won it")
    assert has_answer(nfd_text, ["Röntgen"])
    assert has_answer("Wilhelm Röntgen won it", [unicodedata.normalize("NFD", "röntgen")])


def test_has_answer_regex_searches_the_passage():
    assert has_answer("Denali is 20,310 feet tall.", [r"20,?310\s*f(ee|oo)t"], regex=True)
    assert not has_answer("Denali is tall.", [r"20,?310\s*feet", "(["], regex=True)


def test_answer_recall_at_k_toy_case():
    passages = [
        ["Paris is the capital of France.", "x", "y"],  # hit at rank 1
        ["nothing", "nope", "the answer is 42", "42 again"],  # first hit at rank 3
        ["no", "no"],  # never
    ]
    golds = [["Paris"], ["42"], ["Lyon"]]
    assert answer_recall_at_k(passages, golds, ks=(1, 3, 5)) == {1: 1 / 3, 3: 2 / 3, 5: 2 / 3}
    assert answer_recall_at_k(passages, golds, ks=(2,)) == {2: 1 / 3}


def test_answer_recall_at_k_with_per_question_regex_flags():
    passages = [["it is 20 feet"], ["Lyon"]]
    result = answer_recall_at_k(passages, [[r"\d+ feet"], ["Lyon"]], ks=(1,), regex=[True, False])
    assert result == {1: 1.0}


def test_answer_recall_at_k_rejects_mismatched_inputs():
    with pytest.raises(LatentRagError, match="2 passage lists but 1"):
        answer_recall_at_k([["a"], ["b"]], [["a"]])
    with pytest.raises(LatentRagError, match="positive"):
        answer_recall_at_k([["a"]], [["a"]], ks=(0,))
    with pytest.raises(LatentRagError, match="regex flags"):
        answer_recall_at_k([["a"]], [["a"]], regex=[True, False])


def test_bleu_identical_sentence_is_100():
    scores = bleu(["the quick brown fox jumps"], [["the quick brown fox jumps"]])
    assert scores == pytest.approx({"bleu1": 100.0, "bleu2": 100.0, "bleu3": 100.0, "bleu4": 100.0})


def test_bleu_hand_computed():
    # hyp and ref both 6 tokens (BP = 1). Unigrams: 5/6 match. Bigrams: the-cat, on-the, the-mat of 5: 3/5.
    scores = bleu(["the cat sat on the mat"], [["the cat is on the mat"]], max_order=2)
    assert scores["bleu1"] == pytest.approx(100 * 5 / 6, abs=1e-9)
    assert scores["bleu2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5), abs=1e-9)
    assert set(scores) == {"bleu1", "bleu2"}


def test_bleu_accepts_a_variable_number_of_references():
    scores = bleu(["a b c d", "e f g h"], [["a b c d"], ["x y", "e f g h"]])
    assert scores["bleu4"] == pytest.approx(100.0)


def test_rouge_l_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 each side
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 4/7
    assert rouge_l(["a b c d"], ["a c e"]) == pytest.approx(4 / 7)
    # max over references, mean over examples
    two = rouge_l(["the cat sat on the mat", "x y"], [["zzz", "the cat is on the mat"], ["x y"]])
    assert two == pytest.approx((5 / 6 + 1) / 2)


def test_generation_metrics_reject_mismatched_lengths():
    with pytest.raises(LatentRagError, match="2 predictions but 1"):
        rouge_l(["a", "b"], [["a"]])
    with pytest.raises(LatentRagError, match="no predictions"):
        bleu([], [])


def test_distinct_n_hand_computed():
    # trigrams: (a,b,c), (b,c,d) | (a,b,c): 2 distinct of 3; n-grams never cross outputs
    assert distinct_n(["a b c d", "A B C"], n=3) == pytest.approx(2 / 3)
    # bigrams: (a,b), (b,a), (a,b): 2 of 3
    assert distinct_n(["a b a b"], n=2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", ""], n=3) == 0.0
    assert distinct_n([], n=1) == 0.0


def test_label_accuracy_normalises():
    assert label_accuracy(["SUPPORTS", "refutes."], ["supports", "NOT ENOUGH INFO"]) == 0.5
    with pytest.raises(LatentRagError):
        label_accuracy(["a"], ["a", "b"])


def test_q_bleu1_hand_computed_without_question_words():
    # "Is this a great question?" vs "Is this a good question?":
    #   named entities (capitalised): [is] vs [is]               -> F = 1
    #   question type: none on either side                        -> 0 (the authors score an absent part 0)
    #   relevant words: [great, question] vs [good, question]     -> P = R = 1/2, F = 1/2
    #   function words: [is, this, a] vs [is, this, a]           -> F = 1
    #   Answerability = 0.6*1 + 0.2*0 + 0.1*0.5 + 0.1*1 = 0.75;  BLEU-1 = 4/5
    #   Q-BLEU-1 = 0.7*0.75 + 0.3*0.8 = 0.765
    assert q_bleu1(["Is this a great question?"], ["Is this a good question?"]) == pytest.approx(
        0.765, abs=1e-6
    )


def test_q_bleu1_hand_computed_with_question_word_and_entities():
    # "Who wrote Hamlet in London?" vs "Who wrote Hamlet?":
    #   question type: [who] vs [who]                                -> 1
    #   named entities: [hamlet, london] vs [hamlet]: P = 1/2; the recall direction has 1/1 matched but
    #     the test side (1 token) is shorter than its reference (2): brevity penalty e^(1-2), R = 1/e
    #   relevant words: [wrote] vs [wrote]                           -> 1
    #   function words: [in] vs []                                   -> 0
    #   BLEU-1: 3 of 5 unigrams match, hypothesis longer: 0.6
    ner = 2 * 0.5 * math.exp(-1) / (0.5 + math.exp(-1))
    answerability = 0.6 * ner + 0.2 * 1 + 0.1 * 1 + 0.1 * 0
    expected = 0.7 * answerability + 0.3 * 0.6
    assert q_bleu1(["Who wrote Hamlet in London?"], ["Who wrote Hamlet?"]) == pytest.approx(
        expected, abs=1e-6
    )


def test_q_bleu_reproduces_the_authors_published_example():
    # tests/test_answerability_score.py in PrekshaNema25/Answerability-Metric: Q-BLEU-3 = 0.678
    assert q_bleu(["Is this a great question?"], ["Is this a good question?"], order=3) == pytest.approx(
        0.678, abs=5e-4
    )


def test_q_bleu_best_reference_and_mean_over_questions():
    one = q_bleu1(["Is this a great question?"], [["Who are you?", "Is this a good question?"]])
    assert one == pytest.approx(0.765, abs=1e-6)
    both = q_bleu1(
        ["Is this a great question?", "Is this a great question?"], ["Is this a good question?"] * 2
    )
    assert both == pytest.approx(0.765, abs=1e-6)


def test_q_bleu_rejects_bad_weights():
    with pytest.raises(LatentRagError, match="weights"):
        q_bleu(["a"], ["a"], ner_weight=0.9, qt_weight=0.2)


def test_q_bleu_scores_a_part_absent_from_both_sides_zero_as_the_authors_do():
    # identical question without function words: answerability 0.6 + 0.2 + 0.1 + 0.1*0 = 0.9, BLEU-1 = 1
    assert q_bleu1(["Who wrote Hamlet?"], ["Who wrote Hamlet?"]) == pytest.approx(0.7 * 0.9 + 0.3, abs=1e-6)


def test_bootstrap_interval_matches_scipy_percentile_and_is_seeded():
    import numpy as np
    from scipy.stats import bootstrap

    from latentrag.evaluation.metrics import bootstrap_interval

    values = (np.random.default_rng(3).random(300) < 0.3).astype(float)
    low, high = bootstrap_interval(values, resamples=4000, seed=1)
    assert low < values.mean() < high
    ref = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile",
                    random_state=np.random.default_rng(2)).confidence_interval
    assert abs(low - ref.low) < 0.01 and abs(high - ref.high) < 0.01
    assert bootstrap_interval(values, resamples=4000, seed=1) == (low, high)
    assert bootstrap_interval(values, resamples=4000, seed=5) != (low, high)
    # normal approximation: half-width ≈ 1.96·sqrt(p(1−p)/n); 90 % is narrower than 95 %
    half = 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert abs((high - low) / 2 - half) < 0.01
    low90, high90 = bootstrap_interval(values, confidence=0.9, resamples=4000, seed=1)
    assert high90 - low90 < high - low
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_bootstrap_interval_rejects_bad_input():
    from latentrag.evaluation.metrics import bootstrap_interval

    for args in (([],), ([1.0], 1.5), ([1.0], 0.95, 0)):
        with pytest.raises(LatentRagError):
            bootstrap_interval(*args)
