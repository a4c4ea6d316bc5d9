"""RagModel on tiny random towers and BART: save/load round trip, index pairing, loss = the marginals."""

import pytest
import torch
from tiny_models import QUESTIONS, tiny_bart, tiny_dense_encoder, tiny_passages

from latentrag import marginals
from latentrag.errors import LatentRagError
from latentrag.model import RagModel
from latentrag.retrieval.index import build_index

ANSWERS = ["Paris", "William Shakespeare", "the Nile", "Mount Everest", "Neil Armstrong"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tiny_dense_encoder("dpr-question", seed=0).save_pretrained(root / "q")
    context = tiny_dense_encoder("dpr-context", seed=1)
    context.save_pretrained(root / "ctx")
    model, tok = tiny_bart(seed=2)
    model.save_pretrained(root / "gen")
    tok.save_pretrained(root / "gen")
    build_index(tiny_passages(), context, root / "index", progress=False)
    return root


def _model(parts, **kw):
    return RagModel.from_components(
        index=parts / "index", query_encoder=str(parts / "q"), document_encoder=str(parts / "ctx"),
        generator=str(parts / "gen"), k=3, **kw,
    )


def test_loss_is_the_marginal_of_the_retrieved_batch(parts):
    model = _model(parts)
    with torch.no_grad():
        for mode, fn in (("sequence", marginals.rag_sequence_log_likelihood),
                         ("token", marginals.rag_token_log_likelihood)):
            retrieved = model.retrieve(QUESTIONS, 3)
            batch = model.generator.prepare(retrieved.questions, retrieved.passages, ANSWERS)
            token_lp = marginals.gather_targets(model.generator.vocab_logprobs(batch), batch.targets)
            expected = -fn(retrieved.log_prior, token_lp, batch.target_mask.float()).mean()
            torch.testing.assert_close(model.loss(QUESTIONS, ANSWERS, mode=mode), expected)


def test_save_and_load_round_trip(parts, tmp_path):
    model = _model(parts, mode="sequence", label_smoothing=0.1)
    with torch.no_grad():
        before = model.loss(QUESTIONS, ANSWERS)
    model.save_pretrained(tmp_path / "saved")
    loaded = RagModel.from_pretrained(tmp_path / "saved", index=parts / "index")
    assert loaded.config.mode == "sequence" and loaded.config.label_smoothing == 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded.loss(QUESTIONS, ANSWERS), before)


def test_index_built_by_another_document_tower_is_refused(parts, tmp_path):
    other = tiny_dense_encoder("dpr-context", seed=7)
    build_index(tiny_passages(), other, tmp_path / "other", progress=False)
    model = _model(parts)
    with pytest.raises(LatentRagError, match="document encoder"):
        model.swap_index(tmp_path / "other")
    assert model.retriever.index.directory == parts / "index"


def test_mismatched_answers_and_unknown_mode(parts):
    model = _model(parts)
    with pytest.raises(LatentRagError, match="answers"):
        model.loss(QUESTIONS, ANSWERS[:2])
    with pytest.raises(LatentRagError, match="unknown mode"):
        model.loss(QUESTIONS, ANSWERS, mode="document")
    with pytest.raises(LatentRagError, match="not a saved latentrag model"):
        RagModel.from_pretrained(parts / "gen")
