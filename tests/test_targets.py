"""What a training question is trained toward (`--target`): a gold answer the knowledge source states, as it
writes it — not DPR TriviaQA's first listed alias, which the passages often never contain."""

import json
from types import SimpleNamespace

import pytest

from latentrag.errors import LatentRagError
from latentrag.evaluation.evaluate import AnswerFinder
from latentrag.evaluation.metrics import form_in_texts
from latentrag.training.data import TrainPair, stated_targets
from latentrag.training.reading import read_target
from latentrag.training.trainer import TrainSettings, _check_out

TEXTS = [
    "Henry James was an American-British author of The Portrait of a Lady.",
    "The helicopter is a rotorcraft. Helicopters fly by rotors; helicopters hover; helicopters land.",
    "Nitrous oxide, commonly known as laughing gas, is a chemical compound.",
    "Boxing is a combat sport. Henry James wrote novels.",
]


def test_form_in_texts_takes_the_texts_spelling():
    assert form_in_texts("Henry james", TEXTS) == "Henry James"
    assert form_in_texts("helicopters", TEXTS) == "helicopters"  # written exactly so once: kept
    assert form_in_texts("HELICOPTERS", TEXTS) == "helicopters"  # the most common written form (2 of 3)
    assert form_in_texts("Zanzibar", TEXTS) == "Zanzibar"  # stated nowhere: unchanged
    assert form_in_texts("Henry", ["Henryk Sienkiewicz"]) == "Henry"  # whole words only
    assert form_in_texts("U.S. army", ["the u.s. Army"]) == "u.s. Army"
    assert form_in_texts("( a )", ["x (a) y"]) == "(a)"  # the spaces DPR puts around punctuation


def test_stated_targets_prefer_the_first_answer_when_stated_else_the_most_stated():
    finder = AnswerFinder(TEXTS)
    pairs = [TrainPair("a", "q1", "The Finer Grain", ["The Finer Grain", "Henry james", "James, Henry"]),
             TrainPair("b", "q2", "🚁", ["🚁", "Helicopter", "HELICOPTERS"]),
             TrainPair("c", "q3", "Boxing", ["Boxing", "Nitrous oxide"]),
             TrainPair("d", "q4", "Zanzibar", ["Zanzibar", "Pemba"])]
    got = [p.answer for p in stated_targets(pairs, finder)]
    # "Helicopter" and "HELICOPTERS" are each in one passage: a tie goes to the earlier listed
    assert got == ["Henry James", "helicopter", "Boxing", "Zanzibar"]
    assert [p.answers for p in stated_targets(pairs, finder)] == [p.answers for p in pairs]  # EM keeps every alias


def test_stated_is_the_first_answer_a_passage_holds_else_the_most_held_as_written():
    finder = AnswerFinder([*TEXTS, "Born in Detroit, Michigan, he moved to Detroit, Michigan again."])
    # "The Finer Grain" is in no passage, "Henry james" in two: the form the passages write
    assert finder.stated(["The Finer Grain", "Henry james"]) == "Henry James"
    assert finder.stated(["rotorcraft", "HELICOPTERS"]) == "rotorcraft"  # the first, held: kept
    assert finder.stated(["Zanzibar", "Pemba"]) is None
    assert finder.stated(["Detroit , Michigan"]) == "Detroit, Michigan"  # DPR's tokenised spacing, as written
    assert finder.written("laughing GAS") == "laughing gas" and finder.written("Zanzibar") == "Zanzibar"


def test_read_target_is_what_the_passages_read_state():
    passages = [SimpleNamespace(text=TEXTS[2]), SimpleNamespace(text=TEXTS[0])]
    pair = TrainPair("a", "q", "The Finer Grain", ["The Finer Grain", "henry james", "Nitrous oxide"])
    assert read_target(pair, passages) == "Nitrous oxide"  # the best-ranked passage that holds an answer
    pair = TrainPair("a", "q", "Henry James", ["Nitrous oxide", "Henry James"])
    assert read_target(pair, passages) == "Henry James"  # its own target, when read
    pair = TrainPair("a", "q", "X", ["X", "henry james"])
    assert read_target(pair, passages[1:]) == "Henry James"
    assert read_target(TrainPair("a", "q", "X", ["X"]), passages) == "X"


def test_a_run_from_before_the_setting_resumes_with_its_old_targets(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"k": 3}))
    _check_out(tmp_path, {"k": 3, "target": "first"}, resume=True)  # what it ran with: resumes
    with pytest.raises(LatentRagError, match="target: 'first' → 'stated'"):
        _check_out(tmp_path, {"k": 3, "target": "stated"}, resume=True)
    with pytest.raises(LatentRagError, match="--target is stated or first"):
        TrainSettings(train="x", out=str(tmp_path / "o"), target="last").check()
