"""The §4.5 knowledge-swap test's pieces: whole-word rewriting, substitute pairing, outcome counting, and the
whole protocol on a tiny model whose reader answers from the index it is given."""

import random
from types import SimpleNamespace

import pytest
from tiny_models import tiny_bart, tiny_dense_encoder, tiny_passages

from latentrag.errors import LatentRagError
from latentrag.evaluation.datasets import QAExample
from latentrag.evaluation.evaluate import AnswerFinder
from latentrag.evaluation.knowledge_swap import (
    Swap,
    alias_pattern,
    answer_kind,
    counterfactual_edits,
    outcome,
    plan_swaps,
    prior_on,
    rewrite,
    run_knowledge_swap,
    title_edits,
)
from latentrag.model import RagModel
from latentrag.retrieval.index import EDITS, DenseIndex, build_index


def test_rewrite_is_whole_word_case_insensitive_longest_first_and_one_pass():
    text = "Paris, paris and Parisian; PARIS Hilton lives in Paris. Berlin is big."
    out = rewrite(text, [(["Paris", "Paris Hilton"], "Berlin"), (["Berlin"], "Rome")])
    # Parisian is not the word Paris; "PARIS Hilton" (the longer alias) becomes one substitute;
    # an inserted "Berlin" is not rewritten again, the original "Berlin" is
    assert out == "Berlin, Berlin and Parisian; Berlin lives in Berlin. Rome is big."
    assert rewrite("the U.S. army", [(["U.S."], "France")]) == "the France army"
    assert rewrite("New  York city", [(["new york"], "Lyon")]) == "Lyon city"
    assert alias_pattern("   ") == "" and rewrite("x", [(["  "], "y")]) == "x"


def test_outcome_em_and_contained():
    assert outcome("Berlin", ["Paris"], "Berlin") == "follows"
    assert outcome("the Paris", ["Paris"], "Berlin") == "stays"
    assert outcome("Lyon", ["Paris"], "Berlin") == "other"
    assert outcome("It is Berlin.", ["Paris"], "Berlin", "em") == "other"
    assert outcome("It is Berlin.", ["Paris"], "Berlin", "contained") == "follows"
    assert outcome("Paris or Berlin", ["Paris"], "Berlin", "contained") == "other"
    with pytest.raises(LatentRagError, match="unknown match"):
        outcome("x", ["y"], "z", "fuzzy")


def test_titles_are_rewritten_like_texts_for_the_rows_rewritten():
    swaps = [Swap("a", "q", ["Neil Armstrong", "Armstrong"], substitute="Galileo", rows=[0, 2]),
             Swap("b", "q", ["Paris"], substitute="Rome", rows=[1])]
    titles = ["Neil Armstrong", "Paris", "Apollo 11", "Paris"]
    assert title_edits(swaps, titles) == {0: "Galileo", 1: "Rome"}  # row 3 is no swap's: kept


def test_prior_on_sums_p_z_given_x_over_the_passages_holding_an_answer():
    passages = [SimpleNamespace(text=t) for t in ("Paris is in France.", "Lyon.", "The city of paris.")]
    answer = SimpleNamespace(passages=passages, doc_probs=[0.5, 0.3, 0.2])
    assert prior_on(answer, ["Paris"]) == pytest.approx(0.7)
    assert prior_on(answer, ["Berlin"]) == 0.0


def test_answer_kind():
    assert [answer_kind(a) for a in ("1969", "Neil Armstrong", "gas giant", "van Gogh")] == [
        "number", "name", "phrase", "phrase"]


TEXTS = [p.text for p in tiny_passages()]
SWAPS = [
    Swap("q0", "What is the capital of France?", ["Paris"]),
    Swap("q1", "Who wrote Hamlet?", ["The Bard", "William Shakespeare", "Shakespeare"]),
    Swap("q2", "Who walked on the Moon first?", ["Neil Armstrong"]),
    Swap("q3", "In which year was the Eiffel Tower built?", ["1889"]),
    Swap("q4", "Which city is the French capital?", ["paris"]),  # same answer as q0: dropped
    Swap("q5", "Which river, the Nile or the Congo, flows through Egypt?", ["Nile"]),  # answer in the question
]


def test_plan_pairs_substitutes_from_other_questions_and_drops_clashes():
    finder = AnswerFinder(TEXTS)
    retrieved = {s.id: list(range(len(TEXTS))) for s in SWAPS}
    swaps, dropped = plan_swaps(SWAPS, finder, retrieved, TEXTS, seed=0)
    assert [d["id"] for d in dropped] == ["q4", "q5"] and "shares a gold answer" in dropped[0]["why"]
    assert "in the question" in dropped[1]["why"] and dropped[1]["reason"] == "answer in the question"
    by_id = {s.id: s for s in swaps}
    assert by_id["q0"].rows == [0, 1] and by_id["q1"].rows == [2, 3] and by_id["q3"].rows == [1]
    # the form the passages state ("The Bard" is in none; of the tied aliases, the earlier listed)
    assert by_id["q1"].stated == "William Shakespeare"
    # q0 (Paris) and q3 (1889) share the Eiffel Tower passage: neither may take the other's answer
    assert by_id["q0"].substitute != "1889" and by_id["q3"].substitute != "Paris"
    stated = {s.stated for s in swaps}
    for s in swaps:
        assert s.substitute in stated and s.substitute not in s.golds
    # names get names; the year has no other number to pair with, so it takes a name
    for q in ("q0", "q1", "q2"):
        assert answer_kind(by_id[q].substitute) == "name"
    again, _ = plan_swaps(SWAPS, finder, retrieved, TEXTS, seed=0)
    assert [s.substitute for s in again] == [s.substitute for s in swaps]
    edits, kept, more = counterfactual_edits(swaps, TEXTS)
    assert not more and sorted(edits) == [0, 1, 2, 3, 8]
    for s in kept:
        for r in s.rows:
            assert s.substitute in edits[r]
            assert not any(g.lower() in edits[r].lower().split() for g in s.golds if " " not in g)


def test_a_question_whose_answer_survives_the_rewrite_is_dropped():
    texts = ["The café is in Zürich.", "Bern is the capital."]
    swaps = [Swap("a", "Where is the café?", ["Zu\u0308rich"], "Bern", rows=[0]),  # NFD alias, NFC passage
             Swap("b", "What is the capital?", ["Bern"], "Geneva", rows=[1])]
    edits, kept, dropped = counterfactual_edits(swaps, texts)
    assert [s.id for s in kept] == ["b"] and dropped[0]["id"] == "a" and "survives" in dropped[0]["why"]
    assert edits == {1: "Geneva is the capital."}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tiny_dense_encoder("dpr-question", seed=0).save_pretrained(root / "q")
    context = tiny_dense_encoder("dpr-context", seed=1)
    context.save_pretrained(root / "ctx")
    gen, tok = tiny_bart(seed=2)
    gen.save_pretrained(root / "gen")
    tok.save_pretrained(root / "gen")
    build_index(tiny_passages(), context, root / "index", progress=False)
    return RagModel.from_components(index=root / "index", query_encoder=str(root / "q"),
                                    document_encoder=str(root / "ctx"), generator=str(root / "gen"), k=10)


ANSWERS = ["William Shakespeare", "Neil Armstrong", "Gustave Eiffel", "Ludwig van Beethoven", "Paris"]
# typed substitutes come from here: names for names, "van" names for "van" names
POOL = ["Johann Sebastian Bach", "Isaac Newton", "Marie Curie", "Buzz Aldrin", "Gustave Flaubert", "Vincent van Gogh"]


def _reader(model):
    """A reader that answers from the index it is given: the first known answer in the retrieved passage
    whose title the question names (the longest such title)."""
    def generate(questions, mode=None, k=None, max_new_tokens=None, **_):
        out = []
        for q, passages in zip(questions, model.retrieve(questions, k=k).passages, strict=True):
            named = [p for p in passages if p.title.lower() in q.lower()]
            best = max(named, key=lambda p: len(p.title)) if named else passages[0]
            text = next((a for a in POOL + ANSWERS if a.lower() in best.text.lower()), "no idea")
            out.append(SimpleNamespace(text=text, passages=passages, doc_probs=[1 / len(passages)] * len(passages),
                                       evidence_passage=lambda best=best: best))
        return out
    return generate


@pytest.mark.parametrize("pairing", ["typed", "coarse"])
def test_the_whole_protocol_follows_an_index_a_reader_answers_from(model, tmp_path, monkeypatch, pairing):
    examples = {"tiny": [
        QAExample("Who wrote the tragedy Hamlet?", ["William Shakespeare"], id="h"),
        QAExample("Who walked on the Moon in 1969?", ["Neil Armstrong"], id="m"),
        QAExample("Who built the wrought-iron Eiffel Tower in Paris?", ["Gustave Eiffel"], id="e"),
        QAExample("What was the full name of the composer Beethoven?", ["Ludwig van Beethoven"], id="b"),
        QAExample("What is the largest planet?", ["Saturn"], id="x"),  # not in the passages: not selected
    ]}
    original = model.retriever.index
    monkeypatch.setattr(model, "generate", _reader(model))
    result = run_knowledge_swap(model, examples, tmp_path / "cf", match="em", resamples=200, pairing=pairing,
                                pool_answers=POOL, max_similarity=1.0)  # a random tiny tower: all near
    assert result["selection"]["tiny"] == {"examined": 5, "regex_skipped": 0, "answer_retrieved": 4, "answered": 4}
    assert result["overall"]["n"] == 4 and result["overall"]["follows"]["rate"] == 1.0
    for r in result["records"]:
        assert r["swapped_prediction"] == r["substitute"] != r["original_prediction"] and r["outcome"] == "follows"
    assert model.retriever.index is original  # restored
    assert (tmp_path / "cf" / EDITS).exists() and result["edited_passages"] >= 4
    # a title naming a replaced answer is rewritten with its text ("William Shakespeare" is passage 3)
    swapped = DenseIndex.load(tmp_path / "cf")
    assert swapped.store[3].title == next(r["substitute"] for r in result["records"] if r["id"] == "h")
    assert swapped.store[2].title == "Hamlet"  # a title naming no answer is kept
    low, high = result["overall"]["follows"]["ci95"]
    assert low == high == 1.0
    # the evidence the reader read its answer from: the gold before, a rewritten passage after
    assert result["overall"]["evidence_has_answer_before"] == 1.0
    assert result["overall"]["evidence_rewritten_when_follows"] == 1.0
    # p(z|x) on the passages stating the answer: each record's share of its k, before and after
    for r in result["records"]:
        assert 0 < r["original_prior_on_answer"] <= 1 and 0 < r["swapped_prior_on_substitute"] <= 1
    assert result["overall"]["prior_on_answer_before"] == pytest.approx(
        sum(r["original_prior_on_answer"] for r in result["records"]) / 4)
    split = result["overall"]["follows_by_prior"]  # every tested question on one side of half the mass
    assert split["at_least_half"]["n"] + split["below_half"]["n"] == 4
    heavy = [r for r in result["records"] if r["swapped_prior_on_substitute"] >= 0.5]
    assert split["at_least_half"]["n"] == len(heavy)
    assert result["settings"]["pairing"] == pairing
    if pairing == "typed":
        assert {r["substitute"] for r in result["records"]} <= set(POOL)
        assert next(r["substitute"] for r in result["records"] if r["id"] == "b") == "Vincent van Gogh"
    # a reader that ignores the index stays with what it knew
    monkeypatch.setattr(model, "generate", lambda qs, **_: [
        SimpleNamespace(text=next(ex.answers[0] for ex in examples["tiny"] if ex.question == q), passages=[],
                        doc_probs=[], evidence_passage=lambda: None)
        for q in qs])
    stuck = run_knowledge_swap(model, examples, tmp_path / "cf", resamples=200, pairing=pairing)
    assert stuck["overall"]["stays"]["rate"] == 1.0 and stuck["overall"]["follows"]["rate"] == 0.0


def test_the_typed_pool_takes_answers_as_the_index_states_them(model, tmp_path, monkeypatch):
    """A pool example's substitute is the alias the passages hold, as written — not its first listed alias,
    which no passage may state (DPR TriviaQA's "Apollo (ballet)", "Detroit , Michigan")."""
    examples = {"tiny": [
        QAExample("Who wrote the tragedy Hamlet?", ["William Shakespeare"], id="h"),
        QAExample("Who walked on the Moon in 1969?", ["Neil Armstrong"], id="m"),
    ]}
    pool = [QAExample("Who discovered radium?", ["Curie, Marie (physicist)", "marie CURIE"], id="c"),
            QAExample("Who is in no passage?", ["Nobody Anywhere"], id="n")]
    monkeypatch.setattr(model, "generate", _reader(model))
    result = run_knowledge_swap(model, examples, tmp_path / "cf", resamples=50, pairing="typed",
                                pool_examples=pool, max_similarity=1.0)
    assert result["settings"]["pool"] == 1 and result["settings"]["substitutes"] == "as the index states them"
    assert {r["substitute"] for r in result["records"]} == {"Marie Curie"}


def test_too_few_answered_questions_is_a_clear_error(model, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "generate", lambda qs, **_: [SimpleNamespace(text="no idea", passages=[],
                                                                            evidence_passage=lambda: None) for _ in qs])
    with pytest.raises(LatentRagError, match="at least two"):
        run_knowledge_swap(model, {"tiny": [QAExample("Who wrote Hamlet?", ["William Shakespeare"], id="h")]},
                           tmp_path / "cf")
    assert not (tmp_path / "cf").exists()
    random.seed(0)
