"""RagModel on tiny random towers and BART: save/load round trip, index pairing, loss = the marginals."""

import json
import math

import pytest
import torch
from tiny_models import QUESTIONS, tiny_bart, tiny_dense_encoder, tiny_passages

from latentrag import marginals
from latentrag.errors import LatentRagError
from latentrag.model import RagConfig, RagModel
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


# ---- retrieve once, anywhere ----------------------------------------------------------------------------
def test_a_handed_batch_gives_what_the_ordinary_path_gives(parts):
    model = _model(parts).eval()
    deep = model.retrieve(QUESTIONS, 5)
    with torch.no_grad():
        for mode in ("sequence", "token"):
            expected = model.loss(QUESTIONS, ANSWERS, mode=mode)
            torch.testing.assert_close(model.loss(QUESTIONS, ANSWERS, mode=mode, retrieved=deep.top(3)), expected,
                                       rtol=0, atol=0)
            torch.testing.assert_close(model.loss(QUESTIONS, ANSWERS, mode=mode, k=3, retrieved=deep), expected,
                                       rtol=0, atol=0)
    for mode in ("sequence", "token"):
        expected = [a.to_json() for a in model.generate(QUESTIONS, mode=mode, max_new_tokens=4)]
        handed = [a.to_json() for a in model.generate(QUESTIONS, mode=mode, max_new_tokens=4, retrieved=deep.top(3))]
        assert handed == expected
    assert [len(a.passages) for a in model.generate(QUESTIONS, max_new_tokens=2, retrieved=deep)] == [5] * 5
    with pytest.raises(LatentRagError, match="other questions"):
        model.loss(QUESTIONS[:2], ANSWERS[:2], retrieved=deep)
    with pytest.raises(LatentRagError, match="between 1 and the 5 passages retrieved"):
        model.generate(QUESTIONS, k=6, retrieved=deep)


def test_gradients_flow_through_a_handed_batch(parts):
    model = _model(parts)
    model.zero_grad(set_to_none=True)
    retrieved = model.retrieve(QUESTIONS, 4)
    model.loss(QUESTIONS, ANSWERS, k=2, retrieved=retrieved).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.retriever.query_encoder.parameters())
    model.zero_grad(set_to_none=True)


# ---- picklable --------------------------------------------------------------------------------------------
def test_pickled_and_deep_copied_models_retrieve_and_score_the_same(parts):
    import copy
    import pickle

    model = _model(parts, retrieval_scale=3.0).eval()
    with torch.no_grad():
        retrieved, loss = model.retrieve(QUESTIONS), model.loss(QUESTIONS, ANSWERS)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert clone.retriever.index is not model.retriever.index
        with torch.no_grad():
            again = clone.retrieve(QUESTIONS)
            assert (again.ids == retrieved.ids).all() and torch.equal(again.scores, retrieved.scores)
            assert torch.equal(clone.loss(QUESTIONS, ANSWERS), loss)
        assert clone.retriever.scale == pytest.approx(3.0)


# ---- the retrieval scale of eq. (1) -----------------------------------------------------------------------
def test_scale_one_is_the_plain_inner_product_and_a_scale_multiplies_it(parts):
    model = _model(parts)
    assert model.retriever.scale == 1.0 and not model.retriever.log_scale.requires_grad
    with torch.no_grad():
        retrieved = model.retrieve(QUESTIONS)
        q = model.retriever.query_encoder.embed(QUESTIONS)
        assert torch.equal(retrieved.scores, torch.einsum("bd,bkd->bk", q, retrieved.doc_vectors))
        scaled = _model(parts, retrieval_scale=5.0).retrieve(QUESTIONS)
        torch.testing.assert_close(scaled.scores, 5.0 * retrieved.scores)
        torch.testing.assert_close(scaled.log_prior, torch.log_softmax(5.0 * retrieved.scores, -1))
    with pytest.raises(LatentRagError, match="positive"):
        _model(parts, retrieval_scale=0.0)


def test_a_learned_scale_gets_a_gradient_and_survives_save_and_load(parts, tmp_path):
    model = _model(parts, learn_retrieval_scale=True, retrieval_scale=2.0)
    scale = model.retriever.log_scale
    assert scale.requires_grad and any(p is scale for p in model.parameters())
    model.loss(QUESTIONS, ANSWERS).backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    with torch.no_grad():
        scale.add_(0.3712)  # as an optimiser step would
        before = model.loss(QUESTIONS, ANSWERS)
    model.save_pretrained(tmp_path / "saved")
    assert model.config.retrieval_scale == 2.0  # the running model's config is not rewritten
    loaded = RagModel.from_pretrained(tmp_path / "saved", index=parts / "index")
    assert loaded.config.retrieval_scale == pytest.approx(2.0 * math.exp(0.3712), rel=1e-6)
    assert torch.equal(loaded.retriever.log_scale, scale.detach()) and loaded.retriever.log_scale.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(loaded.loss(QUESTIONS, ANSWERS), before)


# ---- a model's settings are honoured ----------------------------------------------------------------------
def test_overrides_apply_on_top_of_a_config(parts):
    config = RagConfig(query_encoder=str(parts / "q"), document_encoder=str(parts / "ctx"),
                       generator=str(parts / "gen"), mode="sequence", k=4)
    model = RagModel.from_components(index=parts / "index", config=config, k=2, num_beams=3)
    assert (model.config.mode, model.config.k, model.config.num_beams) == ("sequence", 2, 3)
    assert config.k == 4 and not config.document_encoder_identity  # the caller's config is unchanged
    assert model.retrieve(QUESTIONS).k == 2
    with pytest.raises(LatentRagError, match="unknown RagConfig field.*beams"):
        RagModel.from_components(config=config, beams=3)


def test_generate_uses_the_configs_beams(parts, monkeypatch):
    from latentrag import rag_types

    seen = []
    real = rag_types.rag_sequence_decode
    monkeypatch.setattr(rag_types, "rag_sequence_decode",
                        lambda gen, batch, prior, opts, method: seen.append(opts.num_beams) or real(
                            gen, batch, prior, opts, method))
    model = _model(parts, mode="sequence", num_beams=3)
    model.generate(QUESTIONS[:1], decoding="fast", max_new_tokens=2)
    model.generate(QUESTIONS[:1], decoding="fast", max_new_tokens=2, num_beams=2)
    assert seen == [3, 2]


def test_the_document_tower_is_a_frozen_registered_child(parts, tmp_path):
    model = _model(parts)
    tower = model.document_tower
    assert tower is not None and model.document_encoder() is tower
    assert any(name.startswith("document_tower.") for name in model.state_dict())
    assert any(m is tower for m in model.modules())
    model.train()
    assert model.training and model.retriever.query_encoder.training and not tower.training
    assert not any(m.training for m in tower.modules())
    model.requires_grad_(True)
    assert not any(p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in model.retriever.query_encoder.parameters())
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["generator", "parts.json", "query_encoder",
                                                                          "rag_config.json"]
    loaded = RagModel.from_pretrained(tmp_path / "saved", index=parts / "index")
    assert loaded.document_tower is None  # loaded on first use only
    assert loaded.document_encoder().identity() == tower.identity() and loaded.document_tower is not None
    model.to(torch.float64)
    assert next(tower.parameters()).dtype == torch.float64


def test_a_model_unpickled_in_another_process_answers_the_same(parts, tmp_path):
    """As a Ray actor or a spawned worker receives it: the index re-opens, shared-context attention
    re-registers in the fresh process."""
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    import latentrag

    model = _model(parts).eval()
    assert model.generator.shares_contexts  # the case that needs re-registering
    with torch.no_grad():
        loss = model.loss(QUESTIONS, ANSWERS).item()
    text = model.generate(QUESTIONS[:1], max_new_tokens=3)[0].text
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    code = (
        "import json, pickle, sys, torch\n"
        f"model = pickle.loads(open({str(tmp_path / 'model.pkl')!r}, 'rb').read())\n"
        f"questions, answers = {QUESTIONS!r}, {ANSWERS!r}\n"
        "with torch.no_grad():\n"
        "    loss = model.loss(questions, answers).item()\n"
        "print(json.dumps([loss, model.generate(questions[:1], max_new_tokens=3)[0].text]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(latentrag.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    other_loss, other_text = json.loads(out.stdout.strip().splitlines()[-1])
    assert other_loss == pytest.approx(loss, rel=1e-6) and other_text == text
