"""Decoding on both generator kinds (tiny random BART and Llama): search correctness against exhaustive
enumeration, scores against teacher forcing, provenance, the two RAG-Sequence decodings, the interfaces."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tiny_models import QUESTIONS, tiny_decoder_only_generator, tiny_passages, tiny_seq2seq_generator

from latentrag import marginals
from latentrag.errors import LatentRagError
from latentrag.generation.decoding import (
    DecodeOptions,
    PerDocument,
    TokenMarginal,
    marginal_logprobs,
    rag_sequence_decode,
    rag_token_decode,
    search,
    start_answers,
)
from latentrag.generation.generators import GeneratorBatch

K = 3
DOCS = [[0, 1, 4], [2, 3, 9]]


def _bias_eos(gen, bias: float):
    """Make </s> likely enough that answers end at varied lengths."""
    with torch.no_grad():
        if gen.kind == "seq2seq":
            gen.model.final_logits_bias[0, gen.eos_token_id] += bias
        else:
            head = gen.model.get_output_embeddings().weight
            head[gen.eos_token_id] = head.mean(0) + 0.0  # neutral row: </s> sits mid-distribution
    return gen


@pytest.fixture(scope="module", params=["seq2seq", "decoder-only"])
def generator(request):
    if request.param == "seq2seq":
        return _bias_eos(tiny_seq2seq_generator(seed=3), 5.0)
    return _bias_eos(tiny_decoder_only_generator(seed=3, chat_template=True), 0.0)


@pytest.fixture(scope="module")
def batch(generator):
    passages = tiny_passages()
    return generator.prepare(QUESTIONS[:2], [[passages[i] for i in row] for row in DOCS])


@pytest.fixture(scope="module")
def log_prior():
    return marginals.retrieval_log_prior(1.5 * torch.randn(2, K, generator=torch.Generator().manual_seed(7)))


class Restricted:
    """A generator whose next-token distribution is renormalised over a few allowed tokens: small enough a
    search space to enumerate every answer exhaustively."""

    def __init__(self, inner, allowed: list[int]):
        self.inner = inner
        self.mask = torch.full((inner.vocab_size,), float("-inf"))
        self.mask[allowed] = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _restrict(self, logprobs):
        return torch.log_softmax(logprobs + self.mask, dim=-1)

    def start(self, batch, prefix=()):
        state, lp = self.inner.start(batch, prefix)
        return state, self._restrict(lp)

    def step(self, state, tokens):
        state, lp = self.inner.step(state, tokens)
        return state, self._restrict(lp)


def _exhaustive(gen, batch, log_prior, steps: int, allowed: list[int]):
    """Every answer of ≤ `steps` tokens over `allowed` (ending at </s> or at the limit) with its per-passage
    log p_θ(y|x,z) (B, k), from incremental steps on fresh states (no search involved)."""
    eos = gen.eos_token_id
    bsz, k = log_prior.shape
    state0, first = start_answers(gen, batch)
    answers: dict[tuple[int, ...], torch.Tensor] = {}
    frontier = [((), torch.zeros(bsz * k), state0, first)]
    for depth in range(steps):
        nxt = []
        for prefix, ll, state, lp in frontier:
            for tok in allowed:
                total = ll + lp[:, tok]
                seq = (*prefix, tok)
                if tok == eos or depth + 1 == steps:
                    answers[seq] = total.view(bsz, k)
                else:
                    rows = torch.arange(bsz * k)
                    child = gen.select(state, rows)
                    child, child_lp = gen.step(child, torch.full((bsz * k,), tok))
                    nxt.append((seq, total, child, child_lp))
        frontier = nxt
    return answers


@pytest.mark.parametrize("num_beams", [1, 30])
def test_rag_token_search_is_exact_when_nothing_is_pruned(num_beams, generator, batch, log_prior):
    """With more beams than prefixes, beam search (length_penalty 0) returns the argmax over all answers of
    Π_i Σ_z p(z|x) p(y_i|x,z,y_<i); greedy returns the greedy chain. Scores are exact log p(y|x)."""
    eos = generator.eos_token_id
    allowed = [eos, 40, 41, 42, 43]
    gen = Restricted(generator, allowed)
    steps = 3
    with torch.inference_mode():
        decoded = rag_token_decode(gen, batch, log_prior, DecodeOptions(steps, num_beams=num_beams))
        # the RAG-Token marginal of every answer, via incremental per-token marginals
        best = {}
        state0, first = start_answers(gen, batch)
        for seq in itertools.chain.from_iterable(itertools.product(allowed, repeat=n) for n in range(1, steps + 1)):
            if eos in seq[:-1] or (len(seq) < steps and seq[-1] != eos):
                continue
            state, lp, score = gen.select(state0, torch.arange(len(first))), first, torch.zeros(2)
            for i, tok in enumerate(seq):
                score += marginals.rag_token_log_marginal(log_prior, lp.view(2, K, -1))[:, tok]
                if i + 1 < len(seq):
                    state, lp = gen.step(state, torch.full((len(first),), tok))
            best[seq] = score
    for b, d in enumerate(decoded):
        assert d.score == pytest.approx(float(best[tuple(d.token_ids)][b]), abs=1e-4)
        if num_beams > 1:
            assert tuple(d.token_ids) == max(best, key=lambda s: float(best[s][b]))


def test_rag_sequence_beams_per_passage_are_exact_when_nothing_is_pruned(generator, batch, log_prior):
    """Beams under each passage hold its top answers by log p_θ(y|x,z); thorough picks the exact argmax of
    Σ_z p(z|x) p(y|x,z) over the union; both RAG-Sequence scores agree with enumeration."""
    eos = generator.eos_token_id
    allowed = [eos, 40, 41, 42]
    gen = Restricted(generator, allowed)
    steps, beams = 3, 30
    with torch.inference_mode():
        every = _exhaustive(gen, batch, log_prior, steps, allowed)
        opts = DecodeOptions(steps, num_beams=beams)
        state, first = start_answers(gen, batch)
        hyps = search(gen, state, first, PerDocument(), 2 * K, opts)
        thorough = rag_sequence_decode(gen, batch, log_prior, opts, "thorough")
        fast = rag_sequence_decode(gen, batch, log_prior, opts, "fast")
    seqs = list(every)
    table = torch.stack([every[s] for s in seqs])  # (S,B,k)
    for g in range(2 * K):
        b, j = divmod(g, K)
        ranked = sorted(range(len(seqs)), key=lambda i: -float(table[i, b, j]))[:beams]
        got = [tuple(hyps.get(g, i)[0]) for i in range(min(beams, len(seqs)))]
        assert got == [seqs[i] for i in ranked]
    exact = torch.logsumexp(log_prior[None] + table, dim=-1)  # (S,B)
    for b in range(2):
        # every answer is some passage's hypothesis here, so thorough = fast = the exact argmax
        assert tuple(thorough[b].token_ids) == seqs[int(exact[:, b].argmax())]
        assert thorough[b].score == pytest.approx(float(exact[:, b].max()), abs=1e-4)
        assert fast[b].token_ids == thorough[b].token_ids
        assert fast[b].score == pytest.approx(thorough[b].score, abs=1e-4)


def _teacher_forced(gen, batch: GeneratorBatch, answers: list[list[int]]) -> torch.Tensor:
    """log p_θ(y_i|x,z,y_<i) (B,k,T) from the generator's training path `vocab_logprobs`."""
    prefix = gen.answer_prefix
    width = max(len(a) for a in answers) + len(prefix)
    targets = torch.full((len(answers), width), gen.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(answers), width, dtype=torch.long)
    for i, a in enumerate(answers):
        targets[i, : len(prefix) + len(a)] = torch.tensor(prefix + a)
        mask[i, : len(prefix) + len(a)] = 1
    forced = GeneratorBatch(batch.input_ids, batch.attention_mask, batch.k, targets, mask)
    lp = marginals.gather_targets(gen.vocab_logprobs(forced), targets)
    return lp[:, :, len(prefix):]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_scores_and_provenance_match_teacher_forcing(num_beams, generator, batch, log_prior):
    with torch.inference_mode():
        decoded = rag_token_decode(generator, batch, log_prior, DecodeOptions(6, num_beams=num_beams))
        lp = _teacher_forced(generator, batch, [d.token_ids for d in decoded])
    for b, d in enumerate(decoded):
        n = len(d.token_ids)
        torch.testing.assert_close(d.token_logprobs, lp[b, :, :n], rtol=1e-4, atol=1e-4)
        ll = marginals.rag_token_log_likelihood(log_prior[b : b + 1], lp[b : b + 1, :, :n], torch.ones(1, n))
        assert d.score == pytest.approx(float(ll), abs=1e-4)
        assert d.posterior.shape == (n, K)
        torch.testing.assert_close(d.posterior.sum(-1), torch.ones(n))
        torch.testing.assert_close(d.posterior, marginals.token_posterior(log_prior[b : b + 1], lp[b : b + 1, :, :n])[0],
                                   rtol=1e-4, atol=1e-5)


def test_rag_sequence_thorough_and_fast(generator, batch, log_prior):
    opts = DecodeOptions(6, num_beams=2)
    with torch.inference_mode():
        thorough = rag_sequence_decode(generator, batch, log_prior, opts, "thorough")
        fast = rag_sequence_decode(generator, batch, log_prior, opts, "fast")
        lp_t = _teacher_forced(generator, batch, [d.token_ids for d in thorough])
        lp_f = _teacher_forced(generator, batch, [d.token_ids for d in fast])
    for b in range(2):
        exact_t = marginals.rag_sequence_log_likelihood(
            log_prior[b : b + 1], lp_t[b : b + 1, :, : len(thorough[b].token_ids)], torch.ones(1, len(thorough[b].token_ids)))
        exact_f = marginals.rag_sequence_log_likelihood(
            log_prior[b : b + 1], lp_f[b : b + 1, :, : len(fast[b].token_ids)], torch.ones(1, len(fast[b].token_ids)))
        # thorough: exact scores, and its answer is at least as likely as fast's (which is a candidate too)
        assert thorough[b].score == pytest.approx(float(exact_t), abs=1e-4)
        assert thorough[b].score >= float(exact_f) - 1e-4
        # fast: its score drops the passages whose beam did not produce y, so it is a lower bound
        assert fast[b].score <= float(exact_f) + 1e-4
        for d in (thorough[b], fast[b]):
            assert d.posterior.shape == (K,)
            assert float(d.posterior.sum()) == pytest.approx(1.0, abs=1e-5)
            assert d.candidates >= 2
        torch.testing.assert_close(thorough[b].posterior, marginals.sequence_posterior(
            log_prior[b], thorough[b].doc_log_likelihood), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(thorough[b].doc_log_likelihood).all()
        # per passage, whether the beam scored y or the extra pass did: teacher forcing's numbers
        n = len(thorough[b].token_ids)
        torch.testing.assert_close(thorough[b].token_logprobs, lp_t[b, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(thorough[b].doc_log_likelihood, lp_t[b, :, :n].sum(-1), rtol=1e-4, atol=1e-4)
        assert torch.isinf(fast[b].doc_log_likelihood).any() or fast[b].candidates < 2 * K


def test_one_passage_makes_fast_equal_thorough(generator, batch, log_prior):
    one = GeneratorBatch(batch.input_ids[::K], batch.attention_mask[::K], 1)
    prior = torch.zeros(2, 1)
    with torch.inference_mode():
        t = rag_sequence_decode(generator, one, prior, DecodeOptions(5, num_beams=3), "thorough")
        f = rag_sequence_decode(generator, one, prior, DecodeOptions(5, num_beams=3), "fast")
    assert [d.token_ids for d in t] == [d.token_ids for d in f]
    assert [d.score for d in t] == pytest.approx([d.score for d in f], abs=1e-4)


def test_lengths_and_end_of_sequence(generator, batch, log_prior):
    eos = generator.eos_token_id
    with torch.inference_mode():
        for beams in (1, 3):
            for d in rag_token_decode(generator, batch, log_prior, DecodeOptions(7, min_new_tokens=4, num_beams=beams)):
                assert 5 <= len(d.token_ids) <= 7 or (len(d.token_ids) == 7 and eos not in d.token_ids)
                assert eos not in d.token_ids[:-1]
                assert len(d.token_ids) == 7 or d.token_ids[-1] == eos


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("per_document", [True, False])
def test_search_never_writes_into_the_log_probs_it_was_handed(num_beams, per_document, generator, batch, log_prior):
    """min_new_tokens bans </s> in the scores; the first step's log-probs the caller handed in (which
    RAG-Sequence re-uses for teacher forcing) keep their </s> column."""
    eos = generator.eos_token_id
    with torch.inference_mode():
        state, first = start_answers(generator, batch)
        kept = first.clone()
        scorer, groups = (PerDocument(), 2 * K) if per_document else (TokenMarginal(log_prior), 2)
        hyps = search(generator, state, first, scorer, groups, DecodeOptions(4, min_new_tokens=2, num_beams=num_beams))
    assert torch.equal(first, kept) and torch.isfinite(first[:, eos]).all()
    assert all(eos not in hyps.get(g, 0)[0][:2] for g in range(groups))


def test_greedy_equals_the_existing_greedy_api(generator, batch, log_prior):
    from latentrag.generation.decoding import rag_token_greedy

    with torch.inference_mode():
        a = rag_token_greedy(generator, batch, log_prior, max_new_tokens=5)
        b = rag_token_decode(generator, batch, log_prior, DecodeOptions(5, num_beams=1))
    assert [d.token_ids for d in a] == [d.token_ids for d in b]


def test_marginal_equals_logsumexp_even_where_probabilities_underflow():
    torch.manual_seed(0)
    per_doc = (25 * torch.randn(2, 3, 4, 500)).log_softmax(-1)
    prior = torch.randn(2, 4).log_softmax(-1)
    expected = torch.stack([marginals.rag_token_log_marginal(prior, per_doc[:, i]) for i in range(3)], 1)
    assert (expected < -100).any()
    torch.testing.assert_close(marginal_logprobs(prior, per_doc), expected, rtol=1e-6, atol=1e-4)


def test_options_are_checked():
    with pytest.raises(LatentRagError):
        DecodeOptions(max_new_tokens=0).check()
    with pytest.raises(LatentRagError):
        DecodeOptions(4, min_new_tokens=5).check()
    with pytest.raises(LatentRagError):
        DecodeOptions(num_beams=0).check()
    with pytest.raises(LatentRagError):
        DecodeOptions(early_stopping="sometimes").check()


# ---- the RagModel / CLI interface -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["seq2seq", "decoder-only"])
def rag_model(request, tmp_path_factory):
    from tiny_models import tiny_dense_encoder

    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.index import build_index
    from latentrag.retrieval.retriever import Retriever

    document_encoder = tiny_dense_encoder("dpr-context", seed=2)
    index = build_index(tiny_passages(), document_encoder, tmp_path_factory.mktemp("index"), progress=False)
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), document_encoder.identity(), index)
    gen = tiny_seq2seq_generator(seed=0) if request.param == "seq2seq" else tiny_decoder_only_generator(seed=0)
    return RagModel(retriever, gen, RagConfig(k=K, max_new_tokens=5))


@pytest.mark.parametrize("mode,decoding,beams", [("token", None, None), ("token", "beam", 2),
                                                 ("sequence", None, None), ("sequence", "fast", 2)])
def test_generate_returns_answers_with_provenance(mode, decoding, beams, rag_model):
    answers = rag_model.generate(QUESTIONS[:2], mode=mode, decoding=decoding, num_beams=beams, k=K)
    assert len(answers) == 2
    for a in answers:
        assert a.decoding == (decoding or {"token": "greedy", "sequence": "thorough"}[mode])
        assert len(a.passages) == K and sum(a.doc_probs) == pytest.approx(1.0, abs=1e-5)
        if mode == "token":
            assert len(a.posterior) == len(a.tokens) and all(len(row) == K for row in a.posterior)
            assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in a.posterior)
        else:
            assert len(a.posterior) == K and sum(a.posterior) == pytest.approx(1.0, abs=1e-5)
        assert json.dumps(a.to_json())


def test_generate_refuses_bad_settings(rag_model):
    with pytest.raises(LatentRagError, match="RAG-Token decodes"):
        rag_model.generate("Who wrote Hamlet?", mode="token", decoding="thorough")
    with pytest.raises(LatentRagError, match="RAG-Sequence decodes"):
        rag_model.generate("Who wrote Hamlet?", mode="sequence", decoding="beam")
    with pytest.raises(LatentRagError, match="one beam"):
        rag_model.generate("Who wrote Hamlet?", decoding="greedy", num_beams=3)
    with pytest.raises(LatentRagError, match="unknown decoding option"):
        rag_model.generate("Who wrote Hamlet?", temperature=0.7)


def _question_filling(generator, spare: int) -> str:
    """The longest question of repeated words whose prompt (no passage) leaves at most `spare` tokens."""
    from latentrag.retrieval.corpus import Passage

    empty, words = Passage("", "", ""), 1
    while generator._token_counts([generator.input_text("why " * (words + 1), empty)])[0] < (
            generator.max_input_length - spare):
        words += 1
    return "why " * words


def test_zero_tokens_and_a_question_that_fills_the_input_are_refused(rag_model):
    with pytest.raises(LatentRagError, match="max_new_tokens must be at least 1, got 0"):
        rag_model.generate("Who wrote Hamlet?", max_new_tokens=0)  # once silently the default
    too_long = "why " * (2 * rag_model.generator.max_input_length)
    if rag_model.generator.kind == "decoder-only":  # cut from the left: no passage would remain
        with pytest.raises(LatentRagError, match="question 1 takes .* shorten the question"):
            rag_model.generate(["Who wrote Hamlet?", too_long])
        with pytest.raises(LatentRagError, match="shorten the question"):
            rag_model.loss([too_long], ["Shakespeare"])
    else:  # seq2seq reads "passage // question" cut from the right (as HF): the passages stay, with a warning
        from latentrag.errors import LatentRagWarning

        with pytest.warns(LatentRagWarning, match="end of the question"):
            rag_model.loss([too_long], ["Shakespeare"])


def test_cut_prompts_are_warned_about(rag_model):
    import warnings

    from latentrag.errors import LatentRagWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentRagWarning)  # an ordinary question is not cut
        rag_model.generate("Who wrote Hamlet?")
    long = _question_filling(rag_model.generator, spare=3)  # fits alone; no passage fits beside it
    side = "start of the prompt" if rag_model.generator.kind == "decoder-only" else "end of the question"
    with pytest.warns(LatentRagWarning, match=f"{K} of {K} generator inputs exceed max_input_length.*{side}"):
        rag_model.generate(long)


def test_cli_ask_refuses_zero_tokens_and_warns_on_cut_prompts(rag_model, monkeypatch, capsys):
    from latentrag import cli

    def no_model(args):
        raise AssertionError("loaded the model before checking --max-new-tokens")

    monkeypatch.setattr(cli, "load_model", no_model)
    assert cli.main(["--threads", "1", "ask", "Who?", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(cli, "load_model", lambda args: rag_model)
    question = _question_filling(rag_model.generator, spare=3)
    assert cli.main(["--threads", "1", "ask", question, "--k", str(K)]) == 0
    assert "latentrag: warning: " in capsys.readouterr().err


def test_cli_ask_passes_decoding_options(rag_model, monkeypatch, capsys):
    from latentrag import cli

    monkeypatch.setattr(cli, "load_model", lambda args: rag_model)
    code = cli.main(["--threads", "1", "ask", "Who wrote Hamlet?", "--mode", "sequence", "--decoding", "fast",
                     "--beams", "2", "--k", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "sequence" and out["decoding"] == "fast" and len(out["passages"]) == 2
    assert len(out["posterior"]) == 2
    assert cli.main(["--threads", "1", "ask", "Who wrote Hamlet?", "--decoding", "beam", "--beams", "2"]) == 0
    assert "p(z|x,y)=" in capsys.readouterr().out  # the whole answer's evidence, RAG-Token too
    assert cli.main(["--threads", "1", "ask", "Who wrote Hamlet?", "--mode", "token", "--decoding", "fast"]) == 2


def test_on_token_reports_each_greedy_step_as_the_final_answer_has_it(generator, batch, log_prior):
    steps = []
    with torch.inference_mode():
        plain = rag_token_decode(generator, batch, log_prior, DecodeOptions(6, num_beams=1))
        streamed = rag_token_decode(generator, batch, log_prior, DecodeOptions(6, num_beams=1),
                                    on_token=lambda t, ids, post: steps.append((t, ids.clone(), post.clone())))
    assert [d.token_ids for d in streamed] == [d.token_ids for d in plain]
    assert [t for t, _, _ in steps] == list(range(len(steps)))
    for b, d in enumerate(plain):
        reported = [(int(ids[b]), post[b]) for _, ids, post in steps if int(ids[b]) != -1]
        assert [tok for tok, _ in reported] == d.token_ids  # -1 only after the answer ended
        torch.testing.assert_close(torch.stack([p for _, p in reported]), d.posterior)


def test_on_token_stops_decoding_when_it_raises_and_refuses_beams(generator, batch, log_prior):
    class Stop(Exception):
        pass

    def stop(t, ids, post):
        raise Stop

    with torch.inference_mode(), pytest.raises(Stop):
        rag_token_decode(generator, batch, log_prior, DecodeOptions(6, num_beams=1), on_token=stop)
    with torch.inference_mode(), pytest.raises(LatentRagError, match="greedy"):
        rag_token_decode(generator, batch, log_prior, DecodeOptions(6, num_beams=2), on_token=stop)


def test_generate_on_retrieved_passages_and_with_on_token(rag_model):
    questions = QUESTIONS[:3]
    alone = rag_model.generate(questions, k=K)
    retrieved = rag_model.retrieve(questions, K)
    seen = []
    given = rag_model.generate(questions, retrieved=retrieved, on_token=lambda t, ids, post: seen.append(t))
    assert [a.to_json() for a in given] == [a.to_json() for a in alone]
    assert seen == list(range(len(seen))) and seen
    with pytest.raises(LatentRagError, match="other questions"):
        rag_model.generate(questions[:2], retrieved=retrieved)
    with pytest.raises(LatentRagError, match="stream only"):
        rag_model.generate(questions, mode="sequence", on_token=lambda *a: None)
