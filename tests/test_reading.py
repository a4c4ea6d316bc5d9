"""Training that teaches reading (issue 18), on tiny random models: same-type substitutes, the reading filter,
counterfactual augmentation, a gold passage within reach, the retrieval scale's own learning rate, and the
evidence of an answer."""

import json
from dataclasses import replace

import pytest
import torch
from tiny_models import QUESTIONS, save_tiny_parts, tiny_dense_encoder, tiny_train_settings

from latentrag.errors import LatentRagError
from latentrag.evaluation import metrics as M
from latentrag.evaluation.evaluate import reading_scores
from latentrag.evaluation.substitutes import SubstitutePool, answer_kind, as_written, is_alias_of
from latentrag.marginals import answer_posterior, sequence_posterior
from latentrag.training import train
from latentrag.training.data import ExampleStream, TrainPair
from latentrag.training.reading import ReadingSelector, answer_read, build_substitutes, reach_gold
from latentrag.training.trainer import Objective, _optimizer, build_model

_settings = tiny_train_settings


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_tiny_parts(tmp_path_factory.mktemp("parts"), pairs=40, generators=("bart",))


# ---- substitutes --------------------------------------------------------------------------------------
def test_answer_kinds_and_aliases():
    assert [answer_kind(a) for a in ("1966", "Pink Floyd", "gastrointestinal tract")] == ["number", "name", "phrase"]
    assert is_alias_of("David Nolan", ["Nolan North"])  # a shared word: likely the same answer
    assert is_alias_of("june 22, 2018", ["June 4, 2018"])  # numbers: a shared number
    assert is_alias_of("The Beatles", ["Beatles"])
    assert not is_alias_of("1960", ["1966"])
    assert not is_alias_of("Vincent van Gogh", ["Ludwig van Beethoven"])  # a particle is no evidence
    assert not is_alias_of("Aerosmith", ["Pink Floyd"])
    assert is_alias_of("Fordian", ["John Ford"]) and is_alias_of("Chlorofluorocarbons", ["Chlorophyll"])
    assert not is_alias_of("Ford", ["Fiat"])  # short words share no stem
    assert as_written("FOOTBALL") == "Football" and as_written("NATO") == "NATO"


def test_the_pool_ranks_only_answers_of_the_same_kind_and_not_too_near():
    encoder = tiny_dense_encoder("dpr-context", seed=1)
    answers = ["Paris", "1969", "Neil Armstrong", "the river bank", "1815", "London", "Paris"]
    pool = SubstitutePool(answers, encoder, max_similarity=1.0)
    assert len(pool) == 6  # duplicates (after normalisation) once
    ranked = pool.ranked(["Berlin", "1945", "a long way"])
    assert {a for a, _ in ranked[0]} == {"Paris", "Neil Armstrong", "London"}
    assert {a for a, _ in ranked[1]} == {"1969", "1815"}
    assert [a for a, _ in ranked[2]] == ["the river bank"]
    assert all(s1 >= s2 for row in ranked for (_, s1), (_, s2) in zip(row, row[1:], strict=False))  # nearest first
    strict = SubstitutePool(answers, encoder, max_similarity=-1.0)  # everything is "too near": nothing offered
    assert strict.ranked(["Berlin"]) == [[]]
    assert SubstitutePool.choose(ranked[0], ["Paris"]) != "Paris"
    assert SubstitutePool.choose(ranked[0], ["Berlin"], accept=lambda a: a == "London") == "London"
    assert SubstitutePool.choose(ranked[0], ["Berlin"], accept=lambda a: False) is None


class _TableEncoder:
    """Fixed vectors: an answer near a city's name, and questions that ask for a state or for a city."""

    VECTORS = {"Colorado": [1.0, 0.2, 0.0], "Denver": [1.0, 0.0, 0.0], "Texas": [0.6, 0.8, 0.0],
               "state?": [0.0, 0.0, 1.0], "city?": [0.0, 1.0, 0.0], "": [0.0, 1.0, 1.0]}

    def encode(self, texts, batch_size=None, progress=False):
        return torch.tensor([self.VECTORS[t.split()[-1] if t else ""] for t in texts])


def test_the_pool_weighs_the_questions_when_it_knows_them():
    """Denver is the answer nearest Colorado; the question asking for a state is nearer the one for Texas."""
    answers, questions = ["Denver", "Texas"], ["What is the capital city?", "Which is the Lone Star state?"]
    by_answer = SubstitutePool(answers, _TableEncoder(), max_similarity=1.0).ranked(["Colorado"], ["Which state?"])
    assert by_answer[0][0][0] == "Denver"  # the pool knows no questions: the answers' cosine alone
    pool = SubstitutePool(answers, _TableEncoder(), max_similarity=1.0, questions=questions)
    assert pool.ranked(["Colorado"], ["Which state?"])[0][0][0] == "Texas"
    assert pool.ranked(["Colorado"])[0][0][0] == "Denver"  # a query without its question: the answers alone
    with pytest.raises(ValueError, match="one question per answer"):
        SubstitutePool(answers, _TableEncoder(), questions=["only one?"])


# ---- what a step trains on ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(parts):
    settings = _settings(parts, parts / "unused")
    return build_model(settings, str(parts / "index"), torch.device("cpu"))


def _pairs(parts):
    rows = [json.loads(line) for line in (parts / "train.jsonl").read_text().splitlines()]
    return [TrainPair(r["id"], r["question"], r["answers"][0], r["answers"]) for r in rows]


def test_without_options_the_stream_is_taken_as_it_comes(parts, model):
    pairs = _pairs(parts)
    selector = ReadingSelector(model, k=3)
    batch = selector.take(ExampleStream(pairs, seed=0, position=0), 4)
    assert not selector.active and batch.drawn == 4 and batch.rewrites == [None] * 4
    assert [p.id for p in batch.pairs] == [p.id for p in ExampleStream(pairs, seed=0, position=0).take(4)]


def test_the_reading_filter_keeps_only_questions_whose_answer_is_read(parts, model):
    pairs = _pairs(parts)
    selector = ReadingSelector(model, k=1, reading_filter=True)
    stream = ExampleStream(pairs, seed=0, position=0)
    batch = selector.take(stream, 4)
    assert len(batch.pairs) == 4 and batch.drawn >= 4 and batch.stats["kept"] == 4 / batch.drawn
    retrieved = model.retrieve([p.question for p in batch.pairs], 1).passages
    assert all(answer_read(ps, p.answers) for p, ps in zip(batch.pairs, retrieved, strict=True))
    # those it skipped were not read
    skipped = [p for p in ExampleStream(pairs, seed=0, position=0).take(batch.drawn)
               if p.id not in {q.id for q in batch.pairs}]
    for p, ps in zip(skipped, model.retrieve([p.question for p in skipped], 1).passages, strict=True):
        assert not answer_read(ps, p.answers)
    # deterministic: the same stream position gives the same batch
    again = ReadingSelector(model, k=1, reading_filter=True).take(ExampleStream(pairs, seed=0, position=0), 4)
    assert [p.id for p in again.pairs] == [p.id for p in batch.pairs]


def test_nothing_ever_read_is_a_clear_error(parts, model):
    pairs = [TrainPair(f"x{i}", q, "Zanzibar", ["Zanzibar"]) for i, q in enumerate(QUESTIONS)]
    with pytest.raises(LatentRagError, match="leaves nothing to train on"):
        ReadingSelector(model, k=1, reading_filter=True).take(ExampleStream(pairs, seed=0, position=0), 2)


def test_counterfactuals_rewrite_the_passages_read_and_train_toward_the_substitute(parts, model):
    pairs = _pairs(parts)
    substitutes = build_substitutes(pairs, tiny_dense_encoder("dpr-context", seed=1))
    for pair in pairs:  # a random tiny tower puts every answer "too near": offer them all, same kind first
        substitutes[pair.id] = [(a, 0.0) for a in ("Neil Armstrong", "Paris", "the Nile", "Mount Everest",
                                                    "William Shakespeare") if answer_kind(a) == answer_kind(pair.answer)]
    selector = ReadingSelector(model, k=3, reading_filter=True, counterfactual=1.0, substitutes=substitutes)
    batch = selector.take(ExampleStream(pairs, seed=0, position=0), 4)
    changed = [(p, r, t) for p, r, t in zip(batch.pairs, batch.rewrites, batch.targets, strict=True) if r]
    assert changed and batch.stats["counterfactual"] == len(changed)
    from latentrag.training.reading import rewrite_passages

    for pair, (golds, substitute), target in changed:
        assert target == substitute and not is_alias_of(substitute, pair.answers)
        read = rewrite_passages(model.retrieve([pair.question], 3).passages[0], (golds, substitute))
        assert not answer_read(read, pair.answers) and answer_read(read, [substitute])
    # the objective reads the rewritten passages: its loss is the model's on them, toward the substitute
    objective = Objective(model, "token", 3, closed_book=False)
    questions = [p.question for p, _, _ in changed]
    with torch.no_grad():
        got = objective(questions, [t for _, _, t in changed], [r for _, r, _ in changed])
        retrieved = model.retrieve(questions, 3)
        retrieved.passages = [rewrite_passages(ps, r) for ps, (_, r, _) in zip(retrieved.passages, changed,
                                                                              strict=True)]
        want = model(questions, [t for _, _, t in changed], mode="token", retrieved=retrieved)
    torch.testing.assert_close(got, want)


def test_rescored_counterfactuals_are_encoded_as_an_index_holding_them_would_be(parts, model):
    from latentrag.retrieval.index.build import encode_passages
    from latentrag.training.reading import reencode, rewrite_passages

    pairs = _pairs(parts)
    substitutes = {p.id: [("Neil Armstrong", 0.0), ("Mount Everest", 0.0)] for p in pairs}
    selector = ReadingSelector(model, k=3, reading_filter=True, counterfactual=1.0, substitutes=substitutes)
    batch = selector.take(ExampleStream(pairs, seed=0, position=0), 4)
    changed = [(p.question, r, t) for p, r, t in zip(batch.pairs, batch.rewrites, batch.targets, strict=True) if r]
    assert changed
    questions, rewrites, targets = (list(c) for c in zip(*changed, strict=True))
    retrieved = model.retrieve(questions, 3)
    passages = [rewrite_passages(ps, r) for ps, r in zip(retrieved.passages, rewrites, strict=True)]
    scored = reencode(model, retrieved, passages)
    tower = model.document_encoder()
    moved = 0
    for j, (old, new) in enumerate(zip(retrieved.passages, passages, strict=True)):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if (a.title, a.text) == (b.title, b.text):  # untouched: the index's vector, unchanged
                torch.testing.assert_close(scored.doc_vectors[j, i], retrieved.doc_vectors[j, i])
            else:  # rewritten: what building an index over it would store
                want = torch.from_numpy(encode_passages(tower, [b.title], [b.text])[0])
                torch.testing.assert_close(scored.doc_vectors[j, i], want)
                moved += not torch.allclose(want, retrieved.doc_vectors[j, i])
    assert moved and scored.passages == passages and scored.ids.tolist() == retrieved.ids.tolist()
    want_scores = model.retriever.scale * torch.einsum("bd,bkd->bk", retrieved.query_vectors, scored.doc_vectors)
    torch.testing.assert_close(scored.scores, want_scores)
    # the objective reads them with those scores, and the loss's gradient reaches the query tower through them
    objective = Objective(model, "token", 3, closed_book=False, rescore=True)
    model.zero_grad()
    loss = objective(questions, targets, rewrites)
    with torch.no_grad():
        want = model(questions, targets, mode="token", retrieved=reencode(model, model.retrieve(questions, 3), passages))
    torch.testing.assert_close(loss.detach(), want)
    loss.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.retriever.query_encoder.parameters())
    model.zero_grad()
    with pytest.raises(LatentRagError, match="query vectors"):
        model.retriever.rescore(replace(retrieved, query_vectors=None), passages, scored.doc_vectors)


def test_pick_keeps_the_chosen_ranks_and_their_gradients(model):
    deep = model.retrieve(QUESTIONS[:2], 4)
    deep.scores.retain_grad()
    picked = deep.pick([[0, 3], [2, 1]])
    assert picked.k == 2 and picked.ids.tolist() == [[deep.ids[0, 0], deep.ids[0, 3]], [deep.ids[1, 2], deep.ids[1, 1]]]
    assert [p.id for p in picked.passages[1]] == [deep.passages[1][2].id, deep.passages[1][1].id]
    torch.testing.assert_close(picked.doc_vectors[1, 0], deep.doc_vectors[1, 2])
    torch.testing.assert_close(picked.log_prior.exp().sum(-1), torch.ones(2))  # renormalised over the picked
    picked.scores.sum().backward()
    assert deep.scores.grad[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(LatentRagError, match="one list of ranks below 4"):
        deep.pick([[0, 4], [0, 1]])
    with pytest.raises(LatentRagError, match="one list of ranks"):
        deep.pick([[0, 1]])


def test_gold_within_reads_the_best_gold_passage_in_reach(parts, model):
    pairs = _pairs(parts)
    questions, golds = [p.question for p in pairs], [p.answers for p in pairs]
    with torch.no_grad():
        deep = model.retrieve(questions, 6)
    reached = reach_gold(deep, 2, golds)
    moved = 0
    for j, (answers, row) in enumerate(zip(golds, reached.passages, strict=True)):
        top = deep.passages[j][:2]
        first_gold = next((i for i, p in enumerate(deep.passages[j]) if M.has_answer(p.text, answers)), None)
        if first_gold is None or first_gold < 2:  # nothing in reach, or already read: the top k as retrieved
            assert [p.id for p in row] == [p.id for p in top]
        else:  # the k-th gives way to the best-ranked gold passage
            assert [p.id for p in row] == [top[0].id, deep.passages[j][first_gold].id]
            moved += 1
    assert moved  # the tiny data has questions whose answer is only lower down
    # the selector keeps more questions with the filter on, and every one it keeps reads its answer
    only_top = ReadingSelector(model, k=2, reading_filter=True).take(ExampleStream(pairs, seed=0, position=0), 4)
    selector = ReadingSelector(model, k=2, reading_filter=True, gold_within=6)
    batch = selector.take(ExampleStream(pairs, seed=0, position=0), 4)
    assert batch.stats["kept"] >= only_top.stats["kept"] and batch.golds == [list(p.answers) for p in batch.pairs]
    assert 0 <= batch.stats["reached"] <= 4 and only_top.stats["reached"] == 0
    with torch.no_grad():
        read = reach_gold(model.retrieve([p.question for p in batch.pairs], 6), 2, batch.golds).passages
    assert all(answer_read(ps, p.answers) for p, ps in zip(batch.pairs, read, strict=True))
    # the objective's loss is the model's on exactly those passages
    objective = Objective(model, "token", 2, closed_book=False, gold_within=6)
    qs = [p.question for p in batch.pairs]
    with torch.no_grad():
        got = objective(qs, batch.targets, batch.rewrites, batch.golds)
        want = model(qs, batch.targets, mode="token", retrieved=reach_gold(model.retrieve(qs, 6), 2, batch.golds))
    torch.testing.assert_close(got, want)
    with pytest.raises(LatentRagError, match="a depth beyond the k = 2"):
        ReadingSelector(model, k=2, gold_within=2)


def test_bad_reading_settings_are_refused(parts, tmp_path):
    for kw, message in (({"counterfactual": 1.5}, "between 0 and 1"),
                        ({"closed_book": True, "reading_filter": True}, "not with --closed-book"),
                        ({"scale_lr": 0.0, "learn_retrieval_scale": True}, "--scale-lr must be positive"),
                        ({"scale_lr": 1e-2}, "add --learn-retrieval-scale"),
                        ({"gold_within": 3}, "a depth beyond the k = 3"),
                        ({"closed_book": True, "gold_within": 9}, "not with --closed-book"),
                        ({"rescore_counterfactuals": True}, "add --counterfactual")):
        with pytest.raises(LatentRagError, match=message):
            _settings(parts, tmp_path / "a", **kw).check()


def test_the_retrieval_scale_gets_its_own_learning_rate(parts):
    settings = _settings(parts, parts / "unused2", learn_retrieval_scale=True, scale_lr=0.5)
    model = build_model(settings, str(parts / "index"), torch.device("cpu"))
    optimizer, _ = _optimizer(model, settings, total_steps=10)
    own = [g for g in optimizer.param_groups if any(p is model.retriever.log_scale for p in g["params"])]
    assert len(own) == 1 and own[0]["params"] == [model.retriever.log_scale] and own[0]["initial_lr"] == 0.5
    assert own[0]["weight_decay"] == 0.0


def test_a_run_with_filter_and_counterfactuals_logs_what_it_kept(parts, tmp_path):
    settings = _settings(parts, tmp_path / "run", steps=2, eval_every=2, reading_filter=True, counterfactual=0.5,
                         learn_retrieval_scale=True, scale_lr=1e-2, gold_within=5,
                         rescore_counterfactuals=True)
    train(settings, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "step" in r and "val" not in r]
    assert steps and all(0 < r["kept"] <= 1 and r["counterfactual"] >= 0 and r["reached"] >= 0 for r in steps)
    val = next(r["val"] for r in log if "val" in r)
    assert "recall@1" in json.dumps(val) and "reading" in json.dumps(val)


# ---- evidence -----------------------------------------------------------------------------------------
def test_answer_posterior_is_bayes_over_whole_answers():
    log_prior = torch.log_softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), -1)
    token_logprobs = torch.log_softmax(torch.randn(2, 3, 4, 7, generator=torch.Generator().manual_seed(1)), -1)[..., 0]
    got = answer_posterior(log_prior, token_logprobs)
    want = (log_prior + token_logprobs.sum(-1)).exp()
    torch.testing.assert_close(got, want / want.sum(-1, keepdim=True))
    torch.testing.assert_close(got, sequence_posterior(log_prior, token_logprobs.sum(-1)))


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_every_answer_names_its_evidence(model, mode):
    answers = model.generate(QUESTIONS[:2], mode=mode, k=3, max_new_tokens=3)
    for a in answers:
        assert len(a.evidence) == 3 and abs(sum(a.evidence) - 1) < 1e-5
        assert a.evidence_passage() is a.passages[max(range(3), key=a.evidence.__getitem__)]
        if mode == "sequence":
            assert a.evidence == a.posterior
        assert a.to_json()["evidence"] == a.evidence


def test_reading_scores():
    def record(correct, passages, prediction=None):
        return {"correct": correct, "gold": ["Paris"], "passages": passages,
                "prediction": ("Paris" if correct else "Lyon") if prediction is None else prediction}

    paris = {"text": "Paris is the capital.", "evidence": 0.9}
    rome = {"text": "Rome is old.", "evidence": 0.1}
    records = [record(1.0, [paris, rome]),  # read, right, evidence holds it
               record(0.0, [dict(paris, evidence=0.2), dict(rome, evidence=0.8)]),  # read, wrong
               record(1.0, [dict(paris, evidence=0.3), dict(rome, evidence=0.7)]),  # right, evidence elsewhere
               record(1.0, [rome])]  # right without reading it
    scores = reading_scores(records)
    assert scores["answer_read"] == 0.75 and scores["reading_accuracy"] == pytest.approx(2 / 3)
    assert scores["attributed_answers"] == 3 and scores["attribution"] == pytest.approx(1 / 3)
    assert M.has_answer(paris["text"], ["Paris"])
    assert scores["copied"] == 0.5  # two answers are "Paris" with its passage read; "Lyon" and the last are not
    assert scores["wrong_read_copied"] == 0.0
    copying = reading_scores([record(0.0, [paris], prediction="the capital"), record(0.0, [paris], prediction="")])
    assert copying["wrong_read_copied"] == 1.0 and copying["copied"] == 1.0  # the empty answer is not counted
    none = reading_scores([{"correct": 1.0, "gold": ["x"], "passages": []}])
    assert none["reading_accuracy"] is None and none["attribution"] is None and none["copied"] is None
