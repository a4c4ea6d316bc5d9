"""`RagModel.from_pretrained` on Hugging Face RAG checkpoints: tiny random RagToken/RagSequenceForGeneration
models saved with `save_pretrained` (+ RagTokenizer), loaded back by latentrag and by HF, compared.

The index is imported from DPR-format files (`test_import`'s writers) holding the tiny context tower's
vectors. HF's side is computed with HF's own code wherever it runs without the `datasets` package: the
question encoder's pooler output, doc_scores = q·d over the same vectors (exact MIPS in numpy), the question
the generator sees = the question tokenizer's batch_decode, the generator inputs from
`RagRetriever.postprocess_docs` (called unbound: its __init__ needs `datasets`), then HF's forward/generate.
The checkpoints use non-default separators, a prefix, n_docs = 4 and label smoothing, so each must be
carried over for the numbers to agree.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_import import _passages, write_shards, write_tsv
from tiny_models import QUESTIONS, tiny_dense_encoder, tiny_seq2seq_generator
from transformers import RagConfig as HFRagConfig
from transformers import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer

from latentrag.errors import LatentRagError, LatentRagWarning
from latentrag.model import RagModel
from latentrag.retrieval.index import encode_passages
from latentrag.retrieval.index.importers import document_encoder_identity, import_dpr_embeddings

HF_CLASSES = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}
K = 4
MAX_NEW = 8
EOS_BIAS = 4.0
ANSWERS = ["Paris", "William Shakespeare", "the Nile, through Egypt and Sudan"]
TITLE_SEP, DOC_SEP, PREFIX = " | ", " || ", "context: "


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny DPR context tower (saved), its vectors of the passages, and an index imported from DPR files."""
    root = tmp_path_factory.mktemp("corpus")
    ctx = tiny_dense_encoder("dpr-context", seed=2)
    ctx.save_pretrained(root / "ctx")
    ps = _passages()
    vectors = encode_passages(ctx, [p.title for p in ps], [p.text for p in ps])
    tsv = write_tsv(root / "psgs_w100.tsv", ps)
    pattern = write_shards(root / "emb", [p.id for p in ps], vectors, [list(range(0, 30, 2)), list(range(1, 30, 2))])
    index = import_dpr_embeddings(pattern, tsv, root / "index", document_encoder_identity(str(root / "ctx")))
    return SimpleNamespace(ctx_dir=str(root / "ctx"), passages=ps, vectors=vectors, index=index)


def save_checkpoint(folder, mode: str, max_combined_length: int, label_smoothing: float = 0.0):
    """What a user's `RagXForGeneration.save_pretrained` + `RagTokenizer.save_pretrained` writes."""
    generator = tiny_seq2seq_generator(seed=0)
    with torch.no_grad():
        generator.model.final_logits_bias[0, generator.eos_token_id] += EOS_BIAS  # answers end at varied lengths
    generator.model.config.prefix = PREFIX
    question = tiny_dense_encoder("dpr-question", seed=1)
    config = HFRagConfig.from_question_encoder_generator_configs(
        question.model.config, generator.model.config, n_docs=K, label_smoothing=label_smoothing,
        max_combined_length=max_combined_length, title_sep=TITLE_SEP, doc_sep=DOC_SEP,
    )
    HF_CLASSES[mode](config, question_encoder=question.model, generator=generator.model).save_pretrained(folder)
    RagTokenizer(question.tokenizer, generator.tokenizer).save_pretrained(folder)
    return folder


def hf_inputs(folder, corpus, questions):
    """HF's path from questions to generator inputs and doc_scores, over the same document vectors."""
    hf_config = HFRagConfig.from_pretrained(folder)
    cls = HF_CLASSES["token" if hf_config.architectures == ["RagTokenForGeneration"] else "sequence"]
    hf = cls.from_pretrained(folder).eval()
    tok = RagTokenizer.from_pretrained(folder)
    q_in = tok.question_encoder(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        q = hf.rag.question_encoder(**q_in)[0]  # RagModel.forward: question_enc_outputs[0], the DPR pooler
    top = np.argsort(-(q.numpy() @ corpus.vectors.T), axis=1, kind="stable")[:, :K]  # exact MIPS
    doc_embeds = torch.from_numpy(corpus.vectors[top])
    doc_scores = torch.bmm(q.unsqueeze(1), doc_embeds.transpose(1, 2)).squeeze(1)
    docs = [{"title": [corpus.passages[i].title for i in row], "text": [corpus.passages[i].text for i in row]}
            for row in top]
    input_strings = tok.question_encoder.batch_decode(q_in["input_ids"], skip_special_tokens=True)
    retriever = SimpleNamespace(config=hf.config, generator_tokenizer=tok.generator)
    ctx_ids, ctx_mask = RagRetriever.postprocess_docs(
        retriever, docs, input_strings, hf.rag.generator.config.prefix, K, return_tensors="pt")
    return hf, tok, top, doc_scores, ctx_ids, ctx_mask


def load(folder, corpus) -> RagModel:
    return RagModel.from_pretrained(folder, index=corpus.index, document_encoder=corpus.ctx_dir)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_losses_equal_hugging_face_on_a_saved_checkpoint(mode, epsilon, corpus, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", mode, 128, epsilon)  # long enough: no input is cut
    model = load(folder, corpus)
    assert (model.config.mode, model.config.k, model.config.label_smoothing) == (mode, K, epsilon)
    assert (model.generator.title_sep, model.generator.doc_sep) == (TITLE_SEP, DOC_SEP)
    assert model.retriever.query_encoder.pooling == "pooler" and not model.retriever.query_encoder.normalize
    questions = QUESTIONS[:3]
    with torch.no_grad():
        ours = model(questions, ANSWERS)  # mode, k and ε from the checkpoint
        retrieved = model.retrieve(questions)
    hf, tok, top, doc_scores, ctx_ids, ctx_mask = hf_inputs(folder, corpus, questions)
    assert [[p.id for p in row] for row in retrieved.passages] == [[corpus.passages[i].id for i in r] for r in top]
    torch.testing.assert_close(retrieved.scores, doc_scores, rtol=1e-5, atol=1e-5)
    # the generator read exactly HF's strings: prefix, separators, lower-cased question from the DPR tokenizer
    ours_batch = model.generator.prepare(retrieved.questions, retrieved.passages)
    hf_text = tok.generator.decode(ctx_ids[0], skip_special_tokens=True)
    assert tok.generator.decode(ours_batch.input_ids[0], skip_special_tokens=True) == hf_text
    assert hf_text.startswith(PREFIX) and TITLE_SEP in hf_text and hf_text.endswith(DOC_SEP + "what is the capital of france?")

    labels = tok.generator(text_target=ANSWERS, padding=True, return_tensors="pt")["input_ids"]
    start = labels.new_full((len(questions), 1), hf.config.generator.decoder_start_token_id)
    decoder_input_ids = torch.cat([start, labels], dim=1)  # HF takes [start] + y as inputs and targets
    with torch.no_grad():
        theirs = hf(context_input_ids=ctx_ids, context_attention_mask=ctx_mask, doc_scores=doc_scores,
                    decoder_input_ids=decoder_input_ids, labels=decoder_input_ids, reduce_loss=False).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0.0)
    assert ours.min() > 1.0  # real losses, not a degenerate zero


@pytest.mark.parametrize(
    "mode,decoding,num_beams,length",
    [("token", "greedy", 1, 64), ("token", "beam", 3, 64), ("sequence", "thorough", 2, 16), ("sequence", "thorough", 3, 16)],
)
def test_generations_equal_hugging_face(mode, decoding, num_beams, length, corpus, tmp_path):
    """RAG-Sequence runs on inputs truncated to 16 tokens (no padding): HF's per-passage beams drop the
    context mask (see test_hf_generate_parity), latentrag keeps it."""
    folder = save_checkpoint(tmp_path / "ckpt", mode, length)
    model = load(folder, corpus)
    questions = QUESTIONS
    cut = pytest.warns(LatentRagWarning, match="exceed max_input_length")
    with cut:  # inputs are cut on purpose (at max_combined_length, as HF cuts them)
        answers = model.generate(questions, decoding=decoding, num_beams=num_beams, length_penalty=1.0,
                                 max_new_tokens=MAX_NEW)
    hf, tok, _, doc_scores, ctx_ids, ctx_mask = hf_inputs(folder, corpus, questions)
    if mode == "sequence":
        assert bool(ctx_mask.all())
    bos = tok.generator.bos_token_id
    with torch.no_grad():
        out = hf.generate(context_input_ids=ctx_ids, context_attention_mask=ctx_mask, doc_scores=doc_scores,
                          n_docs=K, num_beams=num_beams, max_length=MAX_NEW + 2, min_length=2, length_penalty=1.0,
                          forced_bos_token_id=bos, forced_eos_token_id=None)
    start = hf.config.generator.decoder_start_token_id
    theirs = []
    for row in out.tolist():
        assert row[:2] == [start, bos]
        row = row[2:]
        eos = tok.generator.eos_token_id
        theirs.append(row[: row.index(eos) + 1] if eos in row else [t for t in row if t != tok.generator.pad_token_id])
    assert [a.tokens for a in answers] == [[tok.generator.decode([t]) for t in ids] for ids in theirs]
    assert len({len(ids) for ids in theirs}) >= 2  # answers of several lengths


def test_saved_copy_keeps_the_checkpoint_format_and_refuses_other_towers(corpus, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", "token", 128, 0.1)
    model = load(folder, corpus)
    model.save_pretrained(tmp_path / "latentrag-copy")
    copy = RagModel.from_pretrained(tmp_path / "latentrag-copy", index=corpus.index)
    assert (copy.generator.title_sep, copy.generator.doc_sep, copy.config.mode, copy.config.k) == (
        TITLE_SEP, DOC_SEP, "token", K)
    with torch.no_grad():
        torch.testing.assert_close(copy(QUESTIONS[:3], ANSWERS), model(QUESTIONS[:3], ANSWERS), rtol=1e-6, atol=0.0)

    other = tmp_path / "other-ctx"
    tiny_dense_encoder("dpr-context", seed=7).save_pretrained(other)
    with pytest.raises(LatentRagError, match="rebuild the index"):
        RagModel.from_pretrained(folder, index=corpus.index, document_encoder=str(other))
    # named but not loadable: recorded by name, and an index fingerprinted from weights is refused
    with pytest.raises(LatentRagError, match="rebuild the index"):
        RagModel.from_pretrained(folder, index=corpus.index, document_encoder=str(tmp_path / "missing-ctx"))


def test_bad_checkpoint_folders(tmp_path, corpus):
    folder = save_checkpoint(tmp_path / "ckpt", "sequence", 64)
    for sub in ("question_encoder_tokenizer", "generator_tokenizer"):
        import shutil

        shutil.rmtree(folder / sub)
    with pytest.raises(LatentRagError, match="RagTokenizer.save_pretrained"):
        load(folder, corpus)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentRagError, match="not a saved latentrag model .*nor a Hugging Face RAG checkpoint"):
        RagModel.from_pretrained(tmp_path / "empty")


def test_cli_ask_with_a_hf_checkpoint(corpus, tmp_path, capsys):
    import json

    from latentrag.cli import main

    folder = save_checkpoint(tmp_path / "ckpt", "sequence", 16)
    assert main(["--threads", "1", "ask", "What is the capital of France?", "--model", str(folder), "--index",
                 str(corpus.index.directory), "--document-encoder", corpus.ctx_dir, "--k", "3", "--json",
                 "--max-new-tokens", "4"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["mode"] == "sequence" and len(answer["passages"]) == 3
    expected = load(folder, corpus).generate("What is the capital of France?", k=3, max_new_tokens=4)[0]
    assert answer["answer"] == expected.text


def test_cli_refuses_a_device_that_is_not_there(corpus, tmp_path, capsys):
    from latentrag.cli import main

    folder = save_checkpoint(tmp_path / "ckpt", "token", 16)
    code = main(["--threads", "1", "ask", "Who wrote Hamlet?", "--model", str(folder), "--index",
                 str(corpus.index.directory), "--document-encoder", corpus.ctx_dir, "--device", "nodevice"])
    assert code == 2 and "device" in capsys.readouterr().err

