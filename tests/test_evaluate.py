"""The evaluation loop on a tiny random RAG model over a toy index: outputs, resume, re-scoring, filters."""

import json

import pytest
import torch

from latentrag import cli
from latentrag.errors import LatentRagError
from latentrag.evaluation.datasets import QAExample
from latentrag.evaluation.evaluate import (
    METRICS,
    PREDICTIONS,
    AnswerFinder,
    EvalSettings,
    answerable_ids,
    closed_book_batch,
    closed_book_generate,
    evaluate,
    read_predictions,
    rescore,
    score_records,
)
from latentrag.evaluation.metrics import has_answer
from latentrag.retrieval.corpus import Passage

PASSAGES = [
    Passage("paris#0", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Passage("fe#0", "Iron", "Iron is a chemical element with the symbol Fe and atomic number 26."),
    Passage("jupiter#0", "Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System."),
    Passage("kubrick#0", "Stanley Kubrick", "Stanley Kubrick directed 2001: A Space Odyssey in 1968."),
    Passage("nile#0", "Nile", "The Nile is a major north-flowing river in northeastern Africa."),
    Passage("mozart#0", "Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period."),
]
QUESTIONS = [
    {"question": "What is the capital of France?", "answers": ["Paris"]},
    {"question": "Which element has the symbol Fe?", "answers": ["iron", "Fe"]},
    {"question": "What is the largest planet?", "answers": ["Jupiter"]},
    {"question": "Who directed 2001: A Space Odyssey?", "answers": ["Stanley Kubrick", "Kubrick"]},
    {"question": "Who painted the Mona Lisa?", "answers": ["Leonardo da Vinci"]},  # not in the corpus
    {"question": "Which river flows through Cairo?", "answers": ["Nile"]},
    {"question": "Who wrote the Magic Flute?", "answers": ["Mozart"]},
    {"question": "What is the boiling point of water?", "answers": ["100 degrees"]},  # not in the corpus
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random bi-encoder and decoder-only generator (BERT tokenizer of the bundled MiniLM), toy index."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from latentrag.assets import minilm_dir
    from latentrag.generation.generators import DecoderOnlyGenerator
    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.encoders import DenseEncoder
    from latentrag.retrieval.index import build_index
    from latentrag.retrieval.retriever import Retriever

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    encoder = DenseEncoder(bert.eval(), tokenizer, "mean", True, 64, "tiny-bert")
    root = tmp_path_factory.mktemp("toy")
    index = build_index(PASSAGES, encoder, root / "index", progress=False)
    gen_tok = AutoTokenizer.from_pretrained(minilm_dir())
    gen_tok.eos_token = "[SEP]"
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=gen_tok.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=512))
    generator = DecoderOnlyGenerator(llama.eval(), gen_tok, "tiny-llama", max_input_length=256)
    model = RagModel(Retriever(encoder, encoder.identity(), index), generator, RagConfig(k=3)).eval()
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return model, data


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTRAG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def settings(data, **kw):
    return EvalSettings(dataset=str(data), k=3, max_new_tokens=4, batch_size=3, recall_ks=(1, 2, 6), **kw)


# ---- answerable filter --------------------------------------------------------------------------------
def test_answer_finder_agrees_with_has_answer():
    texts = [p.text for p in PASSAGES]
    finder = AnswerFinder(texts)
    cases = [["Paris"], ["par"], ["Fe"], ["fifth planet"], ["planet fifth"], ["Space Odyssey"], ["26"],
             ["2001: A Space"], ["the capital and"], ["Leonardo"], ["", "Nile"], ["north-flowing"], ["north flowing"]]
    for golds in cases:
        assert finder.contains(golds) == any(has_answer(t, golds) for t in texts), golds
    for patterns in (["Pa.is"], ["capital\\s+and"], ["Mona\\s+Lisa"], ["[unclosed"], ["Sun and the"]):
        expected = any(has_answer(t, patterns, regex=True) for t in texts)
        assert finder.contains(patterns, regex=True) == expected, patterns


def test_regex_match_never_spans_two_passages():
    finder = AnswerFinder(["ends with Seine", "Paris starts here"])
    assert not finder.contains(["Seine\\W+Paris"], regex=True)
    assert finder.contains(["Paris\\s+starts"], regex=True)


def test_answerable_filter_on_toy_corpus_is_cached(toy, cache):
    model, data = toy
    from latentrag.evaluation.datasets import load_dataset

    examples = load_dataset(data)
    ids = answerable_ids(examples, model.retriever.index, str(data))
    assert ids == {ex.id for ex in examples if ex.answers[0] not in ("Leonardo da Vinci", "100 degrees")}
    cached = list((cache / "answerable").glob("*.json"))
    assert len(cached) == 1
    assert set(json.loads(cached[0].read_text())["answerable_ids"]) == ids
    # A different question set is a different cache entry, not a stale hit.
    fewer = examples[:2]
    assert answerable_ids(fewer, model.retriever.index, str(data)) == {fewer[0].id, fewer[1].id}


# ---- the loop -----------------------------------------------------------------------------------------
def test_eval_writes_predictions_metrics_and_report(toy, tmp_path):
    model, data = toy
    result = evaluate(model, settings(data, answerable_only=True), tmp_path / "run", progress=False)
    records = read_predictions(tmp_path / "run" / PREDICTIONS)
    assert len(records) == 6 == result["metrics"]["n"] == result["data"]["evaluated_questions"]
    assert result["data"]["answerable_questions"] == 6 and result["data"]["total_questions"] == 8
    first = records[0]
    assert {"question", "gold", "prediction", "passages", "correct", "f1", "answer_contained"} <= set(first)
    assert len(first["passages"]) == 3
    assert sum(p["probability"] for p in first["passages"]) == pytest.approx(1.0, abs=1e-5)
    assert len(first["retrieved"]) == 6
    metrics = json.loads((tmp_path / "run" / METRICS).read_text())["metrics"]
    assert set(metrics["answer_recall"]) == {"1", "2", "6"}
    assert metrics["answer_recall"]["6"] == 1.0  # the whole toy index: every answerable question hits
    report = (tmp_path / "run" / "report.md").read_text()
    assert "answerable-only filter ON" in report and "6 of 8" in report
    assert (tmp_path / "run" / "recall_at_k.png").stat().st_size > 0


def test_recall_at_k_matches_metrics_module(toy, tmp_path):
    from latentrag.evaluation.metrics import answer_recall_at_k

    model, data = toy
    result = evaluate(model, settings(data), tmp_path / "run", progress=False)
    records = read_predictions(tmp_path / "run" / PREDICTIONS)
    texts = [[model.retriever.index.store[_row(model, p["id"])].text for p in r["retrieved"]] for r in records]
    expected = answer_recall_at_k(texts, [r["gold"] for r in records], ks=(1, 2, 6))
    assert result["metrics"]["answer_recall"] == {str(k): v for k, v in expected.items()}


def _row(model, pid):
    return [p.id for p in PASSAGES].index(pid)


class Interrupting:
    """The model, but generation fails after `calls` batches: an interrupted run."""

    def __init__(self, model, calls):
        self.model, self.calls = model, calls
        self.retriever, self.generator = model.retriever, model.generator

    def retrieve(self, *a, **kw):
        return self.model.retrieve(*a, **kw)

    def generate(self, *a, **kw):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.model.generate(*a, **kw)


def test_resume_skips_done_questions_and_gives_the_same_metrics(toy, tmp_path):
    model, data = toy
    full = evaluate(model, settings(data), tmp_path / "full", progress=False)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        evaluate(Interrupting(model, calls=1), settings(data), run, progress=False)
    assert len(read_predictions(run / PREDICTIONS)) == 3 and not (run / METRICS).exists()
    with open(run / PREDICTIONS, "a") as f:  # a torn line from a crash mid-write
        f.write('{"id": "toy-3", "quest')
    with pytest.raises(LatentRagError, match="--resume"):
        evaluate(model, settings(data), run, progress=False)
    with pytest.raises(LatentRagError, match="other settings"):
        evaluate(model, settings(data, mode="sequence"), run, resume=True, progress=False)
    counting = Interrupting(model, calls=100)
    resumed = evaluate(counting, settings(data), run, resume=True, progress=False)
    assert counting.calls == 100 - 2  # 5 questions left: batches of 3 and 2
    assert resumed["metrics"] == full["metrics"]
    assert [r["id"] for r in read_predictions(run / PREDICTIONS)] == [f"toy-{i}" for i in range(8)]


def test_rescore_reproduces_metrics_without_a_model(toy, tmp_path):
    model, data = toy
    result = evaluate(model, settings(data), tmp_path / "run", progress=False)
    again = rescore(tmp_path / "run" / PREDICTIONS, tmp_path / "rescored")
    assert again["metrics"] == result["metrics"] and again["label"] == result["label"]
    assert (tmp_path / "rescored" / "report.md").exists()
    # Through the CLI, on a hand-edited predictions file: a perfect answer everywhere.
    records = read_predictions(tmp_path / "run" / PREDICTIONS)
    edited = tmp_path / "edited" / PREDICTIONS
    edited.parent.mkdir()
    edited.write_text("".join(json.dumps({**r, "prediction": r["gold"][0]}) + "\n" for r in records))
    assert cli.main(["eval", "--predictions", str(edited)]) == 0
    m = json.loads((edited.parent / METRICS).read_text())["metrics"]
    assert m["exact_match"] == m["f1"] == m["answer_contained"] == 1.0


def test_closed_book_uses_no_passages(toy, tmp_path):
    model, data = toy
    batch = closed_book_batch(model.generator, ["Who wrote the Magic Flute?"])
    prompt = model.generator.tokenizer.decode(batch.input_ids[0])
    assert "passage" not in prompt.lower() and "title" not in prompt.lower() and "magic flute" in prompt.lower()
    assert batch.k == 1
    texts = closed_book_generate(model.generator, [q["question"] for q in QUESTIONS[:3]], max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    result = evaluate(model, settings(data, closed_book=True), tmp_path / "cb", progress=False)
    records = read_predictions(tmp_path / "cb" / PREDICTIONS)
    assert all(r["passages"] == [] and r["retrieved"] == [] for r in records)
    assert [r["prediction"] for r in records[:3]] == texts  # batched decoding = one batch of three
    assert result["metrics"]["answer_recall"] is None and result["label"] == "closed-book"


def test_closed_book_matches_plain_greedy_decoding(toy):
    """The baseline is the generator's own greedy argmax, token by token (no marginalisation left)."""
    model, _ = toy
    gen = model.generator
    batch = closed_book_batch(gen, ["What is the capital of France?"])
    ids, mask = batch.input_ids, batch.attention_mask
    out = []
    with torch.no_grad():
        for _ in range(4):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = gen.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            nxt = int(logits.argmax(-1))
            out.append(nxt)
            if nxt == gen.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    if out[-1] == gen.eos_token_id:
        out = out[:-1]
    assert closed_book_generate(gen, ["What is the capital of France?"], max_new_tokens=4) == [gen.decode_tokens(out)]


# ---- scoring ------------------------------------------------------------------------------------------
def test_score_records_regex_labels_and_generation_metrics():
    records = [
        {"id": "a", "prediction": "Paris", "gold": ["paris"], "regex": False, "retrieved": []},
        {"id": "b", "prediction": "It is Rome.", "gold": ["Rome"], "regex": False, "retrieved": []},
        {"id": "c", "prediction": "1969", "gold": ["19[67]9"], "regex": True, "retrieved": []},
    ]
    m = score_records(records)
    assert m["exact_match"] == pytest.approx(2 / 3)  # Paris (EM) and 1969 (regex); "It is Rome." is not EM
    assert m["regex_match"] == 1.0
    assert m["f1"] == pytest.approx((1 + 0.5) / 2)  # "it is rome" vs "rome": P=1/3, R=1 -> 0.5
    assert m["answer_contained"] == 1.0
    assert m["answer_recall"] is None and m["label_accuracy"] is None
    assert 0 <= m["bleu1"] <= 100 and 0 <= m["rouge_l"] <= 1 and 0 <= m["q_bleu1"] <= 1
    labels = [{"id": "x", "prediction": "SUPPORTS", "gold": ["supports"]},
              {"id": "y", "prediction": "refutes", "gold": ["SUPPORTS"]}]
    assert score_records(labels, labels=True)["label_accuracy"] == 0.5


def test_label_jsonl_reports_label_accuracy(toy, tmp_path):
    model, _ = toy
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"question": q["question"], "label": "SUPPORTS"}) + "\n" for q in QUESTIONS[:2]))
    result = evaluate(model, settings(data), tmp_path / "run", progress=False)
    assert result["data"]["labels"] is True and result["metrics"]["label_accuracy"] is not None


def test_cli_eval_runs_and_sweeps_k(toy, tmp_path, monkeypatch):
    model, data = toy
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    out = tmp_path / "sweep"
    argv = ["eval", "--dataset", str(data), "--answerable-only", "--limit", "3", "--k", "1", "2",
            "--max-new-tokens", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    for k in (1, 2):
        assert json.loads((out / f"k{k}" / METRICS).read_text())["metrics"]["n"] == 3
    report = (out / "report.md").read_text()
    assert "against k" in report.lower() and (out / "figures" / "exact_match_against_k.png").exists()
    assert cli.main(["eval", "--predictions", str(tmp_path / "missing.jsonl")]) == 2


def test_unknown_dataset_and_empty_selection_are_user_errors(toy, tmp_path):
    model, data = toy
    with pytest.raises(LatentRagError, match="unknown dataset"):
        evaluate(model, EvalSettings(dataset="nq-tset"), tmp_path / "x", progress=False)
    for bad in ({"limit": 0}, {"limit": -1}, {"k": 0}):  # -1 once dropped the last question
        with pytest.raises(LatentRagError, match="must be a whole number of at least 1"):
            EvalSettings(dataset=str(data), **bad)
    assert not (tmp_path / "y").exists()


def test_duplicate_question_ids_are_refused_before_anything_runs(toy, tmp_path, capsys, monkeypatch):
    """Predictions are keyed by id: a repeated id once scored one question twice and dropped the other."""
    model, good = toy
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps({**q, "id": "same" if i in (1, 3) else f"q{i}"}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    with pytest.raises(LatentRagError, match=r"dup\.jsonl:4: duplicate question id 'same' \(first at line 2\)"):
        evaluate(model, settings(data), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

    def no_model(args):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(cli, "load_model", no_model)
    assert cli.main(["eval", "--dataset", str(data), "--out", str(tmp_path / "run")]) == 2
    assert "duplicate question id 'same'" in capsys.readouterr().err
    assert cli.main(["eval", "--dataset", str(good), "--limit", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "limit must be a whole number of at least 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # A predictions file holding an id twice (hand-made or from an older version) is not re-scored either.
    result = evaluate(model, settings(good), tmp_path / "ok", progress=False)
    assert result["metrics"]["n"] == len(QUESTIONS)
    lines = (tmp_path / "ok" / PREDICTIONS).read_text().splitlines()
    (tmp_path / "twice.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n")
    assert cli.main(["eval", "--predictions", str(tmp_path / "twice.jsonl")]) == 2
    assert "appears twice" in capsys.readouterr().err


def test_examples_ids_are_unique_in_a_dataset():
    assert len({QAExample("q", ["a"], id=f"d-{i}").id for i in range(3)}) == 3


@pytest.mark.skipif(not __import__("latentrag.rag_types").rag_types.rag_type("sequence").decodings,
                    reason="RAG-Sequence decoding is not in this version")
def test_rag_sequence_runs_through_the_generate_interface(toy, tmp_path):
    model, data = toy
    s = settings(data, mode="sequence", decoding="fast", num_beams=2, limit=3)
    result = evaluate(model, s, tmp_path / "seq", progress=False)
    assert result["label"] == "RAG-Sequence (fast, 2 beams, k=3)" and result["metrics"]["n"] == 3
    assert EvalSettings(dataset="x", mode="sequence").decoding == "thorough"


def test_retrieval_recall_agrees_with_the_eval_loop(toy, tmp_path):
    from latentrag.evaluation.datasets import load_dataset
    from latentrag.evaluation.evaluate import retrieval_recall

    model, data = toy
    result = evaluate(model, settings(data), tmp_path / "run", progress=False)
    assert retrieval_recall(model, load_dataset(data), ks=(1, 2, 6), batch_size=3) == result["metrics"]["answer_recall"]


def test_eval_restores_each_submodule_mode(toy, tmp_path):
    model, data = toy
    model.train()
    model.generator.model.eval()  # e.g. a wrapper in train mode around a Hugging Face model in eval mode
    try:
        evaluate(model, settings(data, limit=1), tmp_path / "run", progress=False)
        assert model.training and model.retriever.training and not model.generator.model.training
    finally:
        model.eval()


def test_evaluation_retrieves_once_per_batch_and_answers_from_that_retrieval(toy, tmp_path, monkeypatch):
    model, data = toy
    calls = []
    real = model.retriever.retrieve
    monkeypatch.setattr(model.retriever, "retrieve", lambda questions, k: calls.append(k) or real(questions, k))
    evaluate(model, settings(data), tmp_path / "run", progress=False)
    assert calls == [6, 6, 6]  # 8 questions in batches of 3, each retrieved once at depth max(recall_ks, k)
    for r in read_predictions(tmp_path / "run" / PREDICTIONS):
        assert [p["id"] for p in r["passages"]] == [p["id"] for p in r["retrieved"][:3]]


def test_unset_settings_come_from_the_models_config(toy, tmp_path, monkeypatch):
    from latentrag.model import RagConfig, RagModel

    base, data = toy
    trained = RagModel(base.retriever, base.generator, RagConfig(mode="sequence", k=2, num_beams=2, max_new_tokens=3))
    result = evaluate(trained, EvalSettings(dataset=str(data), limit=2, recall_ks=(1, 2)), tmp_path / "run",
                      progress=False)
    assert result["label"] == "RAG-Sequence (thorough, 2 beams, k=2)"
    assert {key: result["settings"][key] for key in ("mode", "k", "num_beams", "max_new_tokens")} == {
        "mode": "sequence", "k": 2, "num_beams": 2, "max_new_tokens": 3}
    assert all(len(r["passages"]) == 2 for r in read_predictions(tmp_path / "run" / PREDICTIONS))
    # The CLI leaves them unset unless the user gives them.
    args = cli.build_parser().parse_args(["eval", "--dataset", "x"])
    assert (args.mode, args.k, args.max_new_tokens, args.beams) == (None, None, None, None)
    args = cli.build_parser().parse_args(["ask", "a question"])
    assert (args.mode, args.k, args.max_new_tokens, args.beams) == (None, None, None, None)
    monkeypatch.setattr(cli, "load_model", lambda args: trained)
    assert cli.main(["eval", "--dataset", str(data), "--limit", "1", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / METRICS).read_text())["label"] == "RAG-Sequence (thorough, 2 beams, k=2)"
    assert cli.main(["eval", "--dataset", str(data), "--limit", "1", "--mode", "token", "--k", "1",
                     "--out", str(tmp_path / "cli-token")]) == 0
    assert json.loads((tmp_path / "cli-token" / METRICS).read_text())["label"] == "RAG-Token (greedy, k=1)"
