"""The real default path: bundled MiniLM towers, SmolLM2 generator, a small slice of the wiki-leads corpus."""

import itertools
import json
import shutil

import pytest
import torch

from latentrag.cli import main
from latentrag.errors import LatentRagError
from latentrag.model import RagModel
from latentrag.retrieval.corpus import read_corpus, split_passages
from latentrag.retrieval.encoders import DenseEncoder, freeze
from latentrag.retrieval.index import MANIFEST, DenseIndex, build_index

pytestmark = pytest.mark.integration

QUESTION = "Who directed the film 2001: A Space Odyssey?"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    encoder = freeze(DenseEncoder.from_pretrained("minilm"))
    passages = list(itertools.islice(split_passages(read_corpus("wiki-leads")), 200))
    directory = tmp_path_factory.mktemp("index") / "wiki200"
    build_index(passages, encoder, directory, progress=False)
    return directory


@pytest.fixture(scope="module")
def model(index_dir):
    torch.manual_seed(0)
    return RagModel.from_components(index=index_dir)


def test_retrieval_finds_the_article_and_scores_are_inner_products(model):
    batch = model.retrieve([QUESTION, "What is Western art music of the twentieth century?"], k=5)
    assert batch.passages[0][0].title == "2001: A Space Odyssey"
    assert batch.ids.shape == (2, 5) and batch.doc_vectors.shape == (2, 5, 384)
    q = model.retriever.query_encoder.embed(batch.questions)
    assert torch.allclose(batch.scores, torch.einsum("bd,bkd->bk", q, batch.doc_vectors), atol=1e-5)
    assert torch.allclose(batch.log_prior.exp().sum(-1), torch.ones(2))
    assert (batch.scores[:, :-1] >= batch.scores[:, 1:] - 1e-5).all()  # best first


def test_loss_trains_query_tower_and_generator_not_document_tower(model):
    model.zero_grad()
    for mode in ("token", "sequence"):
        loss = model.loss([QUESTION], ["Stanley Kubrick"], mode=mode, k=3)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
    query_grads = [p.grad for p in model.retriever.query_encoder.parameters() if p.grad is not None]
    assert query_grads and any(g.abs().sum() > 0 for g in query_grads)
    assert any(p.grad is not None for p in model.generator.parameters())
    assert all(not p.requires_grad for p in model.document_encoder().parameters())
    model.zero_grad()


def test_generate_shows_evidence(model):
    answer = model.generate([QUESTION], mode="token", k=3, max_new_tokens=12)[0]
    assert answer.text
    assert len(answer.passages) == 3 and sum(answer.doc_probs) == pytest.approx(1.0, abs=1e-5)
    assert len(answer.posterior) == len(answer.tokens)
    assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in answer.posterior)


def test_bad_input_gets_our_errors(model, index_dir, tmp_path):
    with pytest.raises(LatentRagError, match="empty"):
        model.generate(["   "])
    with pytest.raises(LatentRagError, match="k must be"):
        model.loss([QUESTION], ["x"], k=0)
    with pytest.raises(LatentRagError, match="k must be"):
        model.retrieve([QUESTION], k=1000)
    other = tmp_path / "other"
    shutil.copytree(index_dir, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["encoder"]["sha256"] = "0" * 64
    manifest["encoder"]["name"] = "some-other-encoder"
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LatentRagError, match="document encoder"):
        model.swap_index(other)
    manifest["dim"] = 768
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LatentRagError, match="dim"):
        DenseIndex.load(other)
    assert model.retriever.index.directory == index_dir  # the refused swaps changed nothing


def test_cli_ask_json(index_dir, capsys):
    assert main(["ask", QUESTION, "--index", str(index_dir), "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["question"] == QUESTION and out["answer"]
    assert [set(p) for p in out["passages"]] == [{"id", "title", "text", "probability"}] * 2


def test_cli_errors_are_ours_not_tracebacks(index_dir, capsys):
    assert main(["ask", "  ", "--index", str(index_dir)]) == 2
    assert "error: question 0 is empty" in capsys.readouterr().err
    assert main(["ask", QUESTION, "--index", str(index_dir), "--k", "0"]) == 2
    assert "k must be" in capsys.readouterr().err


def test_the_shipped_default_is_fine_tuned_small_and_answers_briefly(index_dir):
    from latentrag.assets import trained_default_dir

    shipped = trained_default_dir()
    assert shipped is not None, "src/latentrag/default_model is missing: run `make train-default`"
    assert sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file()) <= 60e6
    model = RagModel.from_pretrained(index=index_dir)
    assert all(len(part.source.adapters) == 1 for _, part in model.parts())  # adapters folded into the bases
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}  # README: loss.backward() trains
    unread = {name for name, _ in model.named_parameters() if ".pooler." in name}  # MiniLM mean-pools: never read
    assert unread and trainable == {name for name, _ in model.named_parameters()} - unread
    (answer,) = [a.text for a in model.generate([QUESTION], k=2)]
    assert "Kubrick" in answer and len(answer.split()) <= 4, answer  # a span, not the zero-shot sentence
