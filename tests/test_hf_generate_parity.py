"""Decoding parity with Hugging Face transformers' RAG implementation on identical tiny weights.

HF's `RagTokenForGeneration.generate` and `RagSequenceForGeneration.generate` are fed exactly what
latentrag's seq2seq path produces: `context_input_ids` / `context_attention_mask` from
`Seq2SeqGenerator.prepare` and `doc_scores` (HF takes their log-softmax, latentrag's p_η(z|x)); n_docs = k.
Both share one BART module, so the weights are identical by construction.

The parity configuration (what HF needs to be told to compute what latentrag computes):
  * `forced_bos_token_id=0`: BART labels are "<s> y </s>"; latentrag forces <s> and scores y after it.
    HF's RAG-Sequence re-scoring excludes the <s> score (`exclude_bos_score=True`), so the two agree.
  * `forced_eos_token_id=None`: BART's config forces </s> at the maximum length; latentrag does not.
  * `max_length = max_new_tokens + 2` and `min_length = min_new_tokens + 2`: HF counts the decoder start
    token and <s>; latentrag counts answer tokens.
  * `length_penalty` passed explicitly: HF's default is 1.0 (score / length), latentrag's 0.0 (log p(y|x)).
  * RAG-Sequence only: HF's per-passage beam search drops `context_attention_mask` (it sets
    `attention_mask=None` before `generator.generate`), so there padded contexts attend to their padding.
    latentrag masks padding. The RAG-Sequence comparisons therefore use contexts of one length (no
    padding); `test_per_passage_beams_equal_hf_generate_with_the_mask` checks padded contexts against HF's
    own beam search given the mask.

A bias on </s> makes answers end at varied lengths, so early stopping, the length penalty and the
minimum length are all exercised.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import QUESTIONS, tiny_dense_encoder, tiny_passages, tiny_seq2seq_generator
from transformers import RagConfig as HFRagConfig
from transformers import RagSequenceForGeneration, RagTokenForGeneration

from latentrag.generation.decoding import (
    DecodeOptions,
    PerDocument,
    rag_sequence_decode,
    rag_token_decode,
    search,
    start_answers,
)
from latentrag.marginals import retrieval_log_prior
from latentrag.model import RagConfig, RagModel
from latentrag.retrieval.index import build_index
from latentrag.retrieval.retriever import Retriever

K = 4
DOCS = [[0, 1, 4, 8], [2, 3, 9, 5], [4, 6, 7, 0]]
EOS_BIAS = 6.0  # on </s>: answers of 1 to max_new_tokens tokens
MAX_NEW = 8


def _biased_generator(max_input_length: int):
    gen = tiny_seq2seq_generator(seed=0, max_input_length=max_input_length)
    with torch.no_grad():
        gen.model.final_logits_bias[0, gen.eos_token_id] += EOS_BIAS
    return gen


@pytest.fixture(scope="module")
def unpadded():
    """A generator whose contexts are all truncated to 16 tokens (no padding), and its batch."""
    gen = _biased_generator(16)
    passages = tiny_passages()
    batch = gen.prepare(QUESTIONS[:3], [[passages[i] for i in row] for row in DOCS])
    assert bool(batch.attention_mask.all())
    return gen, batch


@pytest.fixture(scope="module")
def padded():
    gen = _biased_generator(256)
    passages = tiny_passages()
    batch = gen.prepare(QUESTIONS[:3], [[passages[i] for i in row] for row in DOCS])
    assert not bool(batch.attention_mask.all())
    return gen, batch


@pytest.fixture(scope="module")
def question_encoder():
    return tiny_dense_encoder("dpr-question", seed=1)


@pytest.fixture(scope="module")
def scores():
    return 2.0 * torch.randn(3, K, generator=torch.Generator().manual_seed(1))


def hf_rag(cls, generator, question_encoder, k: int = K):
    config = HFRagConfig.from_question_encoder_generator_configs(
        question_encoder.model.config, generator.model.config, n_docs=k
    )
    model = cls(config, question_encoder=question_encoder.model, generator=generator.model)
    assert model.rag.generator is generator.model
    return model.eval()


def hf_generate(cls, generator, question_encoder, batch, doc_scores, opts: DecodeOptions) -> list[list[int]]:
    """HF's generate in the parity configuration; sequences with decoder start and <s> stripped, cut after </s>."""
    model = hf_rag(cls, generator, question_encoder, doc_scores.shape[1])
    with torch.no_grad():
        out = model.generate(
            context_input_ids=batch.input_ids,
            context_attention_mask=batch.attention_mask,
            doc_scores=doc_scores,
            n_docs=doc_scores.shape[1],
            num_beams=opts.num_beams,
            max_length=opts.max_new_tokens + 2,
            min_length=opts.min_new_tokens + 2,
            length_penalty=opts.length_penalty,
            early_stopping=opts.early_stopping,
            forced_bos_token_id=generator.tokenizer.bos_token_id,
            forced_eos_token_id=None,
        )
    return [_strip(generator, row) for row in out.tolist()]


def _strip(generator, row: list[int]) -> list[int]:
    start, bos = generator.model.config.decoder_start_token_id, generator.tokenizer.bos_token_id
    assert row[:2] == [start, bos]
    row = row[2:]
    eos = generator.eos_token_id
    return row[: row.index(eos) + 1] if eos in row else [t for t in row if t != generator.pad_token_id]


def test_answers_start_with_a_forced_bos(unpadded):
    gen, _ = unpadded
    assert gen.answer_prefix == [gen.tokenizer.bos_token_id]
    assert gen.tokenizer(text_target="Paris")["input_ids"][0] == gen.tokenizer.bos_token_id


@pytest.mark.parametrize("min_new", [0, 2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_rag_token_equals_hf(num_beams, length_penalty, min_new, padded, question_encoder, scores):
    """RAG-Token greedy (1 beam) and beam search equal RagTokenForGeneration.generate (padded contexts)."""
    gen, batch = padded
    opts = DecodeOptions(max_new_tokens=MAX_NEW, min_new_tokens=min_new, num_beams=num_beams,
                         length_penalty=length_penalty)
    ours = [d.token_ids for d in rag_token_decode(gen, batch, retrieval_log_prior(scores), opts)]
    assert ours == hf_generate(RagTokenForGeneration, gen, question_encoder, batch, scores, opts)
    assert all(len(ids) > min_new for ids in ours)


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_rag_token_early_stopping_variants_equal_hf(early_stopping, padded, question_encoder, scores):
    gen, batch = padded
    opts = DecodeOptions(max_new_tokens=MAX_NEW, num_beams=3, length_penalty=1.5, early_stopping=early_stopping)
    ours = [d.token_ids for d in rag_token_decode(gen, batch, retrieval_log_prior(scores), opts)]
    assert ours == hf_generate(RagTokenForGeneration, gen, question_encoder, batch, scores, opts)


def test_parity_cases_end_at_varied_lengths(padded, unpadded, scores):
    """The comparisons above are not all full-length runs: </s> ends some answers early, others not."""
    for gen, batch in (padded, unpadded):
        for beams in (1, 4):
            lengths = {len(d.token_ids) for d in rag_token_decode(
                gen, batch, retrieval_log_prior(scores), DecodeOptions(MAX_NEW, num_beams=beams, length_penalty=2.0))}
            lengths |= {len(d.token_ids) for d in rag_token_decode(
                gen, batch, retrieval_log_prior(scores), DecodeOptions(MAX_NEW, 2, num_beams=beams))}
            assert len(lengths) >= 2


@pytest.mark.parametrize("min_new", [0, 2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("num_beams", [1, 2, 3])
def test_rag_sequence_thorough_equals_hf(num_beams, length_penalty, min_new, unpadded, question_encoder, scores):
    """RAG-Sequence thorough decoding equals RagSequenceForGeneration.generate (beams per passage, dedup,
    re-scoring under every passage, argmax of Σ_z p(z|x) p(y|x,z))."""
    gen, batch = unpadded
    opts = DecodeOptions(max_new_tokens=MAX_NEW, min_new_tokens=min_new, num_beams=num_beams,
                         length_penalty=length_penalty)
    decoded = rag_sequence_decode(gen, batch, retrieval_log_prior(scores), opts, "thorough")
    ours = [d.token_ids for d in decoded]
    assert ours == hf_generate(RagSequenceForGeneration, gen, question_encoder, batch, scores, opts)
    assert all(d.candidates > 1 for d in decoded)  # several distinct hypotheses competed


def test_rag_sequence_scores_equal_hf_loss(unpadded, question_encoder, scores):
    """The thorough score of the answer is −HF's RAG-Sequence loss of it with exclude_bos_score=True."""
    gen, batch = unpadded
    decoded = rag_sequence_decode(gen, batch, retrieval_log_prior(scores), DecodeOptions(MAX_NEW, num_beams=2))
    model = hf_rag(RagSequenceForGeneration, gen, question_encoder)
    start, bos = gen.model.config.decoder_start_token_id, gen.tokenizer.bos_token_id
    width = max(len(d.token_ids) for d in decoded) + 2
    labels = torch.full((len(decoded), width), gen.pad_token_id, dtype=torch.long)
    for i, d in enumerate(decoded):
        labels[i, : len(d.token_ids) + 2] = torch.tensor([start, bos, *d.token_ids])
    with torch.no_grad():
        loss = model(context_input_ids=batch.input_ids, context_attention_mask=batch.attention_mask,
                     doc_scores=scores, labels=labels, exclude_bos_score=True).loss
    torch.testing.assert_close(torch.tensor([d.score for d in decoded]), -loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_per_passage_beams_equal_hf_generate_with_the_mask(num_beams, padded):
    """Under padding, latentrag's beams under each passage equal BART's own beam search given the mask."""
    gen, batch = padded
    opts = DecodeOptions(max_new_tokens=MAX_NEW, num_beams=num_beams, length_penalty=1.0)
    with torch.no_grad():
        state, first = start_answers(gen, batch)
        hyps = search(gen, state, first, PerDocument(), batch.input_ids.shape[0], opts)
        out = gen.model.generate(
            batch.input_ids, attention_mask=batch.attention_mask, num_beams=num_beams,
            num_return_sequences=num_beams, max_length=MAX_NEW + 2, length_penalty=1.0,
            forced_bos_token_id=gen.tokenizer.bos_token_id, forced_eos_token_id=None,
        )
    hf = [_strip(gen, row) for row in out.tolist()]
    ours = [hyps.get(g, i)[0] for g in range(batch.input_ids.shape[0]) for i in range(num_beams)]
    assert ours == hf


@pytest.fixture(scope="module")
def rag_model(question_encoder):
    """latentrag's RagModel end to end: tiny DPR towers, a faiss index of the tiny passages, tiny BART."""
    import tempfile

    document_encoder = tiny_dense_encoder("dpr-context", seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(tiny_passages(), document_encoder, tmp, progress=False)
        retriever = Retriever(question_encoder, document_encoder.identity(), index)
        yield RagModel(retriever, _biased_generator(16), RagConfig(k=K, max_new_tokens=MAX_NEW))


@pytest.mark.parametrize(
    "mode,decoding,num_beams,cls",
    [("token", "greedy", 1, RagTokenForGeneration), ("token", "beam", 3, RagTokenForGeneration),
     ("sequence", "thorough", 2, RagSequenceForGeneration)],
)
def test_rag_model_generate_equals_hf(mode, decoding, num_beams, cls, rag_model, question_encoder):
    """RagModel.generate (retrieve with faiss, p_η(z|x) from the DPR scores) against HF given the same
    retrieved contexts and doc_scores."""
    questions = QUESTIONS[:3]
    answers = rag_model.generate(questions, mode=mode, decoding=decoding, num_beams=num_beams, length_penalty=1.0)
    retrieved = rag_model.retrieve(questions, K)
    batch = rag_model.generator.prepare(retrieved.questions, retrieved.passages)
    opts = DecodeOptions(max_new_tokens=MAX_NEW, num_beams=num_beams, length_penalty=1.0)
    hf = hf_generate(cls, rag_model.generator, question_encoder, batch, retrieved.scores.detach(), opts)
    tok = rag_model.generator.tokenizer
    assert [a.text for a in answers] == [tok.decode(ids, skip_special_tokens=True).strip() for ids in hf]
    assert [a.tokens for a in answers] == [[tok.decode([t]) for t in ids] for ids in hf]
