"""Both generator kinds on tiny random models: the batched B·k layout equals one row at a time, and cached
incremental steps reproduce teacher forcing."""

import pytest
import torch
from tiny_models import tiny_decoder_only_generator, tiny_passages, tiny_seq2seq_generator

from latentrag.retrieval.corpus import Passage

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?"]
ANSWERS = ["Paris", "William Shakespeare wrote it"]


def _passages(k: int = 3) -> list[list[Passage]]:
    ps = tiny_passages()
    return [ps[:k], ps[2 : 2 + k]]


@pytest.fixture(params=[False, True], ids=["plain", "chat"])
def decoder_only(request):
    return tiny_decoder_only_generator(seed=1, chat_template=request.param)


def test_decoder_only_batched_rows_equal_unpadded_single_rows(decoder_only):
    gen, passages = decoder_only, _passages()
    batch = gen.prepare(QUESTIONS, passages, ANSWERS)
    batched = gen.vocab_logprobs(batch)  # (B,k,T,V)
    for b, question in enumerate(QUESTIONS):
        answer = batch.targets[b][batch.target_mask[b].bool()]
        for j, passage in enumerate(passages[b]):
            prompt = gen.tokenizer(gen.format_prompt(question, passage), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer[:-1].tolist()])
            logits = gen.model(input_ids=ids).logits[0, len(prompt) - 1 :]
            expected = torch.log_softmax(logits.float(), -1)
            torch.testing.assert_close(batched[b, j, : len(answer)], expected, rtol=1e-4, atol=1e-5)


def test_decoder_only_loss_covers_answer_and_eos_only(decoder_only):
    batch = decoder_only.prepare(QUESTIONS, _passages(), ANSWERS)
    first = batch.targets[0][batch.target_mask[0].bool()].tolist()
    assert first[-1] == decoder_only.eos_token_id
    assert decoder_only.tokenizer.decode(first[:-1]).strip() == "Paris"


def _incremental_matches_teacher_forcing(gen):
    batch = gen.prepare(QUESTIONS, _passages(), ANSWERS)
    teacher = gen.vocab_logprobs(batch)  # (B,k,T,V)
    bsz, k, width = teacher.shape[:3]
    state, logprobs = gen.start(batch)
    targets = batch.targets.repeat_interleave(k, dim=0)  # (B·k, T)
    mask = batch.target_mask.repeat_interleave(k, dim=0).bool()
    for t in range(width):
        step = logprobs.view(bsz, k, -1)
        rows = mask[:, t].view(bsz, k)
        torch.testing.assert_close(step[rows], teacher[:, :, t][rows], rtol=1e-4, atol=1e-4)
        if t + 1 < width:
            state, logprobs = gen.step(state, targets[:, t])


def test_decoder_only_cached_steps_reproduce_teacher_forcing(decoder_only):
    _incremental_matches_teacher_forcing(decoder_only)


def test_seq2seq_cached_steps_reproduce_teacher_forcing():
    _incremental_matches_teacher_forcing(tiny_seq2seq_generator(seed=2))


def test_seq2seq_input_format_is_the_papers():
    gen = tiny_seq2seq_generator()
    text = gen.format_input("Who wrote Hamlet?", Passage("1", '"Hamlet"', "Hamlet is a tragedy."))
    assert text == "Hamlet / Hamlet is a tragedy. // Who wrote Hamlet?"


def test_seq2seq_batched_rows_equal_single_rows():
    gen, passages = tiny_seq2seq_generator(seed=3), _passages()
    batch = gen.prepare(QUESTIONS, passages, ANSWERS)
    batched = gen.vocab_logprobs(batch)
    for b, question in enumerate(QUESTIONS):
        for j, passage in enumerate(passages[b]):
            single = gen.prepare([question], [[passage]], [ANSWERS[b]])
            expected = gen.vocab_logprobs(single)[0, 0]
            width = int(single.target_mask.sum())
            torch.testing.assert_close(batched[b, j, :width], expected[:width], rtol=1e-4, atol=1e-5)
