"""One RagModel serving many threads: nothing per call mutates shared state (the tokenizer's padding or
truncation side, its backend settings), so concurrent `generate` calls give the sequential answers."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import QUESTIONS, tiny_bart, tiny_dense_encoder, tiny_llama, tiny_passages

from latentrag.evaluation.evaluate import closed_book_generate
from latentrag.model import RagModel
from latentrag.retrieval.index import build_index

THREADS, ROUNDS = 4, 3
pytestmark = pytest.mark.filterwarnings("ignore::latentrag.errors.LatentRagWarning")  # rows cut on purpose


@pytest.fixture(scope="module", params=["seq2seq", "decoder-only"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    tiny_dense_encoder("dpr-question", seed=0).save_pretrained(root / "q")
    context = tiny_dense_encoder("dpr-context", seed=1)
    context.save_pretrained(root / "ctx")
    generator, tokenizer = tiny_bart(seed=2) if request.param == "seq2seq" else tiny_llama(seed=2, chat_template=True)
    generator.save_pretrained(root / "gen")
    tokenizer.save_pretrained(root / "gen")
    build_index(tiny_passages(), context, root / "index", progress=False)
    return RagModel.from_components(index=root / "index", query_encoder=str(root / "q"),
                                    document_encoder=str(root / "ctx"), generator=str(root / "gen"), k=3,
                                    # short enough that some rows are cut (seq2seq on the right, LMs on the
                                    # left), long enough for the LM's prompt around each question
                                    max_input_length=48 if request.param == "seq2seq" else 120)


def _run_at_once(jobs):
    """Run every job in its own thread, all released together; return results in job order."""
    barrier, results, errors = threading.Barrier(len(jobs)), [None] * len(jobs), []

    def work(i):
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except Exception as e:  # surfaced below, with the thread's exception
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_generate_from_four_threads_gives_the_sequential_answers(model):
    # different batches per thread: different padding widths, so a call run with another's settings shows
    batches = [QUESTIONS[i:] + QUESTIONS[:i] for i in range(THREADS)]
    batches = [b[: 2 + i] for i, b in enumerate(batches)]
    settings = [dict(mode="token"), dict(mode="sequence", num_beams=2), dict(mode="token", decoding="beam",
                num_beams=2), dict(mode="sequence", decoding="fast", num_beams=2)]
    call = [lambda b=b, s=s: [a.to_json() for a in model.generate(b, max_new_tokens=5, **s)]
            for b, s in zip(batches, settings, strict=True)]
    expected = [c() for c in call]
    prompt_side = model.generator.tokenizer.padding_side, model.generator.tokenizer.truncation_side
    for _ in range(ROUNDS):
        assert _run_at_once(call) == expected
    assert (model.generator.tokenizer.padding_side, model.generator.tokenizer.truncation_side) == prompt_side


def test_training_batches_and_closed_book_alongside_generation(model):
    """Teacher-forced batches (the answers' tokenizer settings) and closed-book prompts, concurrently with
    generation, are the ones built alone."""
    gen = model.generator
    answers = ["Paris", "William Shakespeare", "the Nile"]

    def loss():
        with torch.no_grad():
            return float(model.loss(QUESTIONS[:3], answers))

    call = [loss, lambda: [a.text for a in model.generate(QUESTIONS[:2], max_new_tokens=4)],
            lambda: closed_book_generate(gen, QUESTIONS[1:4], max_new_tokens=4), loss]
    expected = [c() for c in call]
    for _ in range(ROUNDS):
        got = _run_at_once(call)
        assert got[1:3] == expected[1:3]
        assert got[0] == pytest.approx(expected[0], rel=1e-5) and got[3] == pytest.approx(expected[3], rel=1e-5)
