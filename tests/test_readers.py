"""Concatenation and Fusion-in-Decoder beside RAG-Sequence and RAG-Token, on tiny random models.

* concat: the loss is the generator's own loss (Hugging Face's, labels given) on the one concatenated input;
* fid: the loss equals a hand-built pass — each (question, passage) encoded alone, unpadded, the states
  concatenated, one decoder over them;
* decoding (greedy and beam) gives the text the generator's own `generate` gives on the same input;
* at k = 1 all kinds read the same input and agree; provenance, refusals and input budget.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import (
    QUESTIONS,
    tiny_decoder_only_generator,
    tiny_dense_encoder,
    tiny_passages,
    tiny_seq2seq_generator,
)

from latentrag.errors import LatentRagError, LatentRagWarning
from latentrag.model import RagConfig, RagModel
from latentrag.rag_types import MODES, RAG_TYPES, rag_type
from latentrag.retrieval.index import build_index
from latentrag.retrieval.retriever import Retriever

K = 3
MAX_NEW = 6
ANSWERS = ["Paris", "William Shakespeare", "the Nile"]


def _bias_eos(gen, bias: float):
    """Make </s> likely enough that answers end at varied lengths (beam search's stopping is exercised)."""
    with torch.no_grad():
        if gen.kind == "seq2seq":
            gen.model.final_logits_bias[0, gen.eos_token_id] += bias
    return gen


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    document_encoder = tiny_dense_encoder("dpr-context", seed=2)
    return build_index(tiny_passages(), document_encoder, tmp_path_factory.mktemp("index"), progress=False), \
        document_encoder.identity()


def _model(index, kind: str, **config) -> RagModel:
    index, identity = index
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), identity, index)
    gen = _bias_eos(tiny_seq2seq_generator(seed=3), 2.0) if kind == "seq2seq" else \
        tiny_decoder_only_generator(seed=3, chat_template=True)
    return RagModel(retriever, gen, RagConfig(k=K, max_new_tokens=MAX_NEW, **config))


@pytest.fixture(scope="module", params=["seq2seq", "decoder-only"])
def rag_model(request, index):
    return _model(index, request.param)


@pytest.fixture(scope="module")
def seq2seq_model(index):
    return _model(index, "seq2seq")


@pytest.fixture(scope="module")
def retrieved(rag_model):
    return rag_model.retrieve(QUESTIONS[:3], K)


def test_four_kinds_side_by_side():
    assert MODES == ("sequence", "token", "concat", "fid")
    assert [RAG_TYPES[m].latent for m in MODES] == [True, True, False, False]
    assert [RAG_TYPES[m].title for m in MODES] == ["RAG-Sequence", "RAG-Token", "Concatenation", "Fusion-in-Decoder"]
    assert rag_type("concat").default_decoding == rag_type("fid").default_decoding == "greedy"
    with pytest.raises(LatentRagError, match="'concat'.*'fid'"):
        rag_type("stuff")


# ---- losses -------------------------------------------------------------------------------------------------


def _concat_ids(gen, question, passages) -> torch.Tensor:
    """The concatenated input as the generator's own tokenizer reads it (no padding, one question)."""
    text = gen.concat_text(question, passages)
    ids = gen.tokenizer(text, add_special_tokens=gen.adds_special_tokens)["input_ids"]
    assert len(ids) <= gen.max_input_length
    return torch.tensor([ids])


def _hf_loss(gen, input_ids: torch.Tensor, answer: str, epsilon: float) -> float:
    """−Σ_i log p(y_i|·) from the Hugging Face model's own `labels=` loss (a mean over the answer's tokens,
    times their number), label smoothing as `CrossEntropyLoss(label_smoothing=ε)`."""
    if gen.kind == "seq2seq":
        labels = gen.tokenizer(text_target=[answer], return_tensors="pt")["input_ids"]
        logits = gen.model(input_ids=input_ids, labels=labels).logits
        targets = labels
    else:
        answer_ids, _ = gen._answer_ids([answer])  # the generator's answer format: text, then </s>
        full = torch.cat([input_ids, answer_ids], dim=1)
        labels = torch.cat([torch.full_like(input_ids, -100), answer_ids], dim=1)
        out = gen.model(input_ids=full, labels=labels)
        logits, targets = out.logits[:, input_ids.shape[1] - 1 : -1], answer_ids
        assert torch.isclose(out.loss * targets.numel(), torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"), rtol=1e-5)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                   reduction="sum", label_smoothing=epsilon))


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_concat_loss_is_the_generators_own_loss_on_the_concatenated_input(epsilon, rag_model, retrieved):
    with torch.no_grad():
        ours = rag_model(retrieved.questions, ANSWERS, mode="concat", epsilon=epsilon, retrieved=retrieved)
        theirs = [_hf_loss(rag_model.generator, _concat_ids(rag_model.generator, q, ps), a, epsilon)
                  for q, ps, a in zip(retrieved.questions, retrieved.passages, ANSWERS, strict=True)]
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-4, atol=1e-4)


def _fused_by_hand(gen, question, passages):
    """Each (question, passage) encoded alone with no padding, the states concatenated along the sequence."""
    from transformers.modeling_outputs import BaseModelOutput

    states = []
    for p in passages:
        ids = gen.tokenizer([gen.format_input(question, p)], return_tensors="pt")["input_ids"]
        states.append(gen.model.get_encoder()(input_ids=ids).last_hidden_state)
    fused = torch.cat(states, dim=1)
    return BaseModelOutput(last_hidden_state=fused), torch.ones(fused.shape[:2], dtype=torch.long)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_fid_loss_equals_a_hand_built_pass_over_concatenated_encoder_states(epsilon, seq2seq_model):
    gen = seq2seq_model.generator
    retrieved = seq2seq_model.retrieve(QUESTIONS[:3], K)
    assert not bool(gen.prepare_fused(retrieved.questions, retrieved.passages).attention_mask.all())  # padded rows
    with torch.no_grad():
        ours = seq2seq_model(retrieved.questions, ANSWERS, mode="fid", epsilon=epsilon, retrieved=retrieved)
        theirs = []
        for q, ps, a in zip(retrieved.questions, retrieved.passages, ANSWERS, strict=True):
            encoder_outputs, mask = _fused_by_hand(gen, q, ps)
            labels = gen.tokenizer(text_target=[a], return_tensors="pt")["input_ids"]
            logits = gen.model(encoder_outputs=encoder_outputs, attention_mask=mask, labels=labels).logits
            theirs.append(float(torch.nn.functional.cross_entropy(
                logits[0].float(), labels[0], reduction="sum", label_smoothing=epsilon)))
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-4, atol=1e-4)


def test_fid_is_not_concat_and_not_rag(seq2seq_model):
    retrieved = seq2seq_model.retrieve(QUESTIONS[:3], K)
    with torch.no_grad():
        losses = {m: seq2seq_model(retrieved.questions, ANSWERS, mode=m, retrieved=retrieved) for m in MODES}
    for a in MODES:
        for b in MODES:
            if a < b:
                assert not torch.allclose(losses[a], losses[b], atol=1e-3), (a, b)


def test_at_one_passage_every_kind_reads_the_same_input_and_agrees(rag_model):
    retrieved = rag_model.retrieve(QUESTIONS[:3], 1)
    modes = [m for m in MODES if m != "fid" or rag_model.generator.kind == "seq2seq"]
    with torch.no_grad():
        losses = [rag_model(retrieved.questions, ANSWERS, mode=m, retrieved=retrieved) for m in modes]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-4, atol=1e-4)


def test_concat_gives_the_query_tower_no_gradient_and_rag_does(rag_model, retrieved):
    tower = rag_model.retriever.query_encoder.model
    weight = next(p for p in tower.parameters() if p.dim() == 2)
    weight.requires_grad_(True)
    try:
        for mode, expected in (("concat", False), ("token", True)):
            weight.grad = None
            rag_model.loss(QUESTIONS[:3], ANSWERS, mode=mode).backward()
            assert (weight.grad is not None and bool(weight.grad.abs().sum() > 0)) == expected, mode
    finally:
        weight.requires_grad_(False)
        weight.grad = None
        rag_model.generator.zero_grad(set_to_none=True)


# ---- decoding -----------------------------------------------------------------------------------------------


def _hf_generate(gen, num_beams: int, **inputs) -> str:
    kwargs = dict(num_beams=num_beams, do_sample=False, length_penalty=0.0, early_stopping=False,
                  pad_token_id=gen.pad_token_id, eos_token_id=gen.eos_token_id)
    with torch.no_grad():
        if gen.kind == "seq2seq":  # HF counts the decoder start and the forced <s>; latentrag answer tokens
            out = gen.model.generate(**inputs, max_length=MAX_NEW + 2, forced_bos_token_id=gen.tokenizer.bos_token_id,
                                     forced_eos_token_id=None, **kwargs)[0, 2:]
        else:
            out = gen.model.generate(**inputs, max_new_tokens=MAX_NEW, **kwargs)[0, inputs["input_ids"].shape[1]:]
    return gen.tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("decoding,beams", [("greedy", None), ("beam", 2), ("beam", 4)])
def test_concat_decoding_equals_the_generators_own_generate(decoding, beams, rag_model, retrieved):
    gen = rag_model.generator
    answers = rag_model.generate(retrieved.questions, mode="concat", decoding=decoding, num_beams=beams,
                                 retrieved=retrieved)
    texts = []
    for q, ps in zip(retrieved.questions, retrieved.passages, strict=True):
        ids = _concat_ids(gen, q, ps)
        texts.append(_hf_generate(gen, beams or 1, input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert [a.text for a in answers] == texts
    assert sum(bool(a.text) for a in answers) >= 2  # answers, not empty strings: a real comparison


@pytest.mark.parametrize("decoding,beams", [("greedy", None), ("beam", 2), ("beam", 4)])
def test_fid_decoding_equals_the_generators_own_generate_on_fused_states(decoding, beams, seq2seq_model):
    gen = seq2seq_model.generator
    retrieved = seq2seq_model.retrieve(QUESTIONS[:3], K)
    answers = seq2seq_model.generate(retrieved.questions, mode="fid", decoding=decoding, num_beams=beams,
                                     retrieved=retrieved)
    texts = []
    for q, ps in zip(retrieved.questions, retrieved.passages, strict=True):
        encoder_outputs, mask = _fused_by_hand(gen, q, ps)
        texts.append(_hf_generate(gen, beams or 1, encoder_outputs=encoder_outputs, attention_mask=mask))
    assert [a.text for a in answers] == texts


@pytest.mark.parametrize("mode", ["concat", "fid"])
def test_answers_carry_p_z_given_x_and_an_empty_posterior(mode, rag_model, retrieved):
    if mode == "fid" and rag_model.generator.kind != "seq2seq":
        pytest.skip("fid reads with seq2seq generators")
    answers = rag_model.generate(retrieved.questions, mode=mode, decoding="beam", num_beams=2, retrieved=retrieved)
    prior = retrieved.log_prior.exp()
    for b, a in enumerate(answers):
        assert a.mode == mode and a.decoding == "beam" and a.posterior == []
        assert a.passages == retrieved.passages[b]
        assert a.doc_probs == pytest.approx(prior[b].tolist(), abs=1e-6)
        assert a.log_prob <= 0.0 and len(a.tokens) >= 1
        body = json.loads(json.dumps(a.to_json()))
        assert body["posterior"] == [] and len(body["passages"]) == K


def test_the_score_is_the_teacher_forced_log_likelihood(rag_model, retrieved):
    """The decoded answer's score is log p_θ(y|x,z_1..z_k), the same number `log_likelihood` gives for it."""
    from latentrag.generation.decoding import DecodeOptions, reader_decode

    gen, kind = rag_model.generator, rag_type("concat")
    batch = kind.prepare(gen, retrieved.questions, retrieved.passages)
    decoded = reader_decode(gen, batch, DecodeOptions(MAX_NEW, num_beams=2))
    width = max(len(d.token_ids) for d in decoded)
    prefix = gen.answer_prefix
    targets = torch.full((len(decoded), width + len(prefix)), gen.pad_token_id)
    mask = torch.zeros_like(targets)
    for i, d in enumerate(decoded):
        targets[i, : len(prefix) + len(d.token_ids)] = torch.tensor([*prefix, *d.token_ids])
        mask[i, len(prefix) : len(prefix) + len(d.token_ids)] = 1  # the forced <s> is not scored
    batch.targets, batch.target_mask = targets, torch.ones_like(targets)
    with torch.no_grad():
        lp = kind.vocab_logprobs(gen, batch)
    token_lp = lp.gather(-1, targets[:, None, :, None]).squeeze(-1)
    ll = kind.log_likelihood(retrieved.log_prior, token_lp, mask)
    torch.testing.assert_close(ll, torch.tensor([d.score for d in decoded]), rtol=1e-4, atol=1e-4)
    assert kind.posterior(retrieved.log_prior, token_lp, mask).shape == (len(decoded), 0)


# ---- refusals and the input budget ------------------------------------------------------------------------


def test_fid_is_refused_for_a_decoder_only_generator(index):
    model = _model(index, "decoder-only")
    for call in (lambda: model.generate("Who wrote Hamlet?", mode="fid"),
                 lambda: model.loss(["Who wrote Hamlet?"], ["Shakespeare"], mode="fid")):
        with pytest.raises(LatentRagError, match="needs an encoder-decoder generator.*use mode 'concat'"):
            call()
    with pytest.raises(LatentRagError, match="encoder-decoder"):
        rag_type("fid").prepare(model.generator, ["q"], [tiny_passages()[:2]])


@pytest.mark.parametrize("kind", ["seq2seq", "decoder-only"])
def test_concat_cuts_the_lowest_ranked_passages_first_and_warns(kind, index):
    model = _model(index, kind)
    gen = model.generator
    passages = tiny_passages()[:K]
    question = QUESTIONS[1]
    full = gen._token_counts([gen.concat_text(question, passages)])[0]
    last = len(gen._plain_tokens(passages[-1].text)["input_ids"])
    gen.max_input_length = full - last // 2  # half of the last passage must go
    try:
        with pytest.warns(LatentRagWarning, match=f"1 of 1 concatenated generator inputs exceed max_input_length="
                                                  f"{gen.max_input_length} tokens and lose up to {full - gen.max_input_length}"):
            batch = gen.prepare_concat([question], [passages])
        text = gen.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()], skip_special_tokens=True)
        assert int(batch.attention_mask.sum()) <= gen.max_input_length
        assert question in text and passages[0].text in text and passages[1].text in text
        assert passages[-1].title in text and passages[-1].text not in text
        assert passages[-1].text.split()[0] in text  # its start is kept
        gen.max_input_length = full
        with warnings.catch_warnings():
            warnings.simplefilter("error", LatentRagWarning)
            gen.prepare_concat([question], [passages])
    finally:
        gen.max_input_length = 512 if kind == "decoder-only" else 256


def test_the_concatenated_input_holds_every_passage_in_retrieval_order(rag_model, retrieved):
    gen = rag_model.generator
    batch = rag_type("concat").prepare(gen, retrieved.questions, retrieved.passages, ANSWERS)
    assert batch.k == 1 and batch.input_ids.shape[0] == 3 and batch.targets.shape[0] == 3
    for row, (q, ps) in enumerate(zip(retrieved.questions, retrieved.passages, strict=True)):
        text = gen.tokenizer.decode(batch.input_ids[row][batch.attention_mask[row].bool()], skip_special_tokens=True)
        positions = [text.index(p.text) for p in ps]
        assert positions == sorted(positions) and q in text


# ---- saved configs, CLI, evaluation, validation ------------------------------------------------------------


def test_a_saved_concat_config_answers_in_its_mode(rag_model, retrieved, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(rag_model, "config", replace(rag_model.config, mode="concat"))  # RagConfig is frozen
    answers = rag_model.generate(retrieved.questions, retrieved=retrieved)
    assert all(a.mode == "concat" and a.posterior == [] and a.evidence == [] and a.decoding == "greedy"
               for a in answers)


def test_cli_ask_and_eval_take_the_new_modes(rag_model, monkeypatch, capsys, tmp_path):
    from latentrag import cli

    monkeypatch.setattr(cli, "load_model", lambda args: rag_model)
    assert cli.main(["ask", "Who wrote Hamlet?", "--mode", "concat", "--decoding", "beam", "--beams", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: Who wrote Hamlet?") and "p(z|x)=" in out and "p(z|x,y" not in out
    assert cli.main(["ask", "Who wrote Hamlet?", "--mode", "concat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["posterior"] == []
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n"
                            for q, a in zip(QUESTIONS[:3], ANSWERS, strict=True)))
    assert cli.main(["eval", "--dataset", str(data), "--mode", "concat", "--k", "2",
                     "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["settings"]["mode"] == "concat" and metrics["label"].startswith("Concatenation (greedy, k=2)")


def test_validation_decodes_the_new_modes_greedily(rag_model):
    from latentrag.training.data import TrainPair
    from latentrag.training.validation import validate

    pairs = [TrainPair(str(i), q, a, [a]) for i, (q, a) in enumerate(zip(QUESTIONS[:3], ANSWERS, strict=True))]
    for mode in ("concat", "fid") if rag_model.generator.kind == "seq2seq" else ("concat",):
        metrics = validate(rag_model, pairs, mode, K, max_new_tokens=4)
        assert metrics["n"] == 3 and metrics["loss"] > 0 and "prior_entropy" in metrics


@pytest.mark.parametrize("mode", ["concat", "sequence"])
def test_beam_search_over_one_question_and_one_context(mode, rag_model):
    """One question, one context row, two beams: the decoder-only shared-prompt attention once failed here
    (a `view` of a tensor that is not contiguous when there is a single context)."""
    gen = rag_model.generator
    retrieved = rag_model.retrieve(QUESTIONS[1:2], 1)
    answer = rag_model.generate(retrieved.questions, mode=mode, decoding="beam" if mode == "concat" else "fast",
                                num_beams=2, retrieved=retrieved)[0]
    if mode == "concat":
        ids = _concat_ids(gen, retrieved.questions[0], retrieved.passages[0])
        assert answer.text == _hf_generate(gen, 2, input_ids=ids, attention_mask=torch.ones_like(ids))


# ---- training and serving ----------------------------------------------------------------------------------


def test_the_cli_offers_every_mode():
    from latentrag import cli
    from latentrag.serving.schemas import AskRequest

    assert tuple(sorted(MODES, key=cli.MODES.index)) == cli.MODES and set(cli.MODES) == set(MODES)
    assert set(AskRequest.model_fields["mode"].annotation.__args__[0].__args__) == set(MODES)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from tiny_models import save_tiny_parts

    return save_tiny_parts(tmp_path_factory.mktemp("parts"), pairs=20, cycle=3)


def _train_settings(parts, out, **kw):
    from tiny_models import tiny_train_settings

    return tiny_train_settings(parts, out, **{"steps": 2, "val_questions": 2, "max_new_tokens": 3, **kw})


@pytest.mark.parametrize("mode,generator", [("concat", "bart"), ("concat", "llama"), ("fid", "bart")])
def test_concat_and_fid_train_the_generator_with_the_query_tower_frozen(mode, generator, parts, tmp_path, capsys):
    from safetensors.torch import load_file

    from latentrag.training import checkpoints as ckpt
    from latentrag.training import train

    model_dir = train(_train_settings(parts, tmp_path / "run", mode=mode, generator=str(parts / generator)),
                      progress=False)
    assert "the query tower gets no gradient and stays frozen" in capsys.readouterr().err
    saved = load_file(tmp_path / "run" / "checkpoint-000002" / ckpt.TRAINABLE)
    assert saved and all("generator" in name for name in saved)  # nothing of the retriever trained
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if "val" in r][-1]["val"]["n"] == 2
    loaded = RagModel.from_pretrained(model_dir, index=parts / "index")
    assert loaded.config.mode == mode  # the saved config answers in its mode
    answer = loaded.generate(QUESTIONS[0])[0]
    assert answer.mode == mode and answer.posterior == []


def test_training_refuses_fid_on_a_decoder_only_generator_and_a_scale_it_cannot_learn(parts, tmp_path):
    from latentrag.training import train

    with pytest.raises(LatentRagError, match="encoder-decoder"):
        train(_train_settings(parts, tmp_path / "a", mode="fid", generator=str(parts / "llama")), progress=False)
    with pytest.raises(LatentRagError, match="learn-retrieval-scale.*no gradient"):
        train(_train_settings(parts, tmp_path / "b", mode="concat", learn_retrieval_scale=True), progress=False)
    assert not (tmp_path / "b").exists()


def test_serving_answers_in_the_new_modes_and_refuses_fid_without_an_encoder(index, tmp_path):
    from fastapi.testclient import TestClient

    from latentrag.serving import create_app
    from latentrag.serving.service import RagService

    root = tmp_path / "indexes"
    root.mkdir()
    (root / "facts").symlink_to(index[0].directory)
    for kind in ("seq2seq", "decoder-only"):
        model = _model(index, kind)
        with TestClient(create_app(RagService(model, root, "facts", admin_token=""))) as client:
            for mode in ("concat", "fid"):
                r = client.post("/v1/ask", json={"question": "Who wrote Hamlet?", "mode": mode, "decoding": "beam",
                                                 "num_beams": 2, "k": 2})
                if mode == "fid" and kind == "decoder-only":
                    assert r.status_code == 422 and "encoder-decoder" in r.json()["error"], r.text
                    continue
                assert r.status_code == 200, r.text
                body = r.json()
                alone = model.generate("Who wrote Hamlet?", mode=mode, decoding="beam", num_beams=2, k=2)[0]
                assert body["mode"] == mode and body["posterior"] == [] and body["answer"] == alone.text
                assert [p["probability"] for p in body["passages"]] == pytest.approx(alone.doc_probs, abs=1e-5)
            r = client.post("/v1/ask", json={"question": "Who wrote Hamlet?", "mode": "concat", "stream": True})
            assert r.status_code == 422 and "streaming" in r.json()["error"]


def test_train_settings_refuse_an_unknown_mode(tmp_path):
    from latentrag.training import TrainSettings

    with pytest.raises(LatentRagError, match="unknown mode 'concatenate'"):
        TrainSettings(train="x", out=str(tmp_path), mode="concatenate").check()
    TrainSettings(train="x", out=str(tmp_path), mode="fid").check()
