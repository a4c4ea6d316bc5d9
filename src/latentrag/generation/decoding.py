"""Decoding the paper's two models (Lewis et al. 2020, §2.5), batched over questions, beams and passages,
and the two kinds that read all k passages at once (concatenation, Fusion-in-Decoder).

RAG-Token. The per-token marginal p'(y_i|x,y_<i) = Σ_z p_η(z|x) p_θ(y_i|x,z,y_<i) is an ordinary
autoregressive transition, so greedy and beam search apply unchanged: every step runs all B·beams·k
(question, beam, passage) rows in one cached forward and marginalises in log space (`logsumexp`).

RAG-Sequence. p(y|x) = Σ_z p_η(z|x) p_θ(y|x,z) does not factor over tokens. A beam search runs under each
passage (B·k independent searches, again one forward per step); their hypotheses, deduplicated, form the
candidate set Y of each question.
  * thorough: every y ∈ Y is scored under every passage: z's beam already scored the y it produced, and
    the other (y, z) pairs of the whole batch are scored in one batched teacher-forced pass that reuses the
    prefix computed once per (question, passage) (encoder outputs and cross-attention keys/values, or the
    prompt's cache for decoder-only models); the argmax of Σ_z p_η(z|x) p_θ(y|x,z) is returned;
  * fast: p_θ(y|x,z) ≈ 0 when y did not come out of z's beam, so the beams' own scores suffice and no
    extra pass runs.

Concatenation and Fusion-in-Decoder. One input per question (one prompt, or the k encodings fused), so
p_θ(y|x,z_1..z_k) is an ordinary autoregressive model: `reader_decode` runs the same greedy and beam search
with one row per question — what the generator's own `generate` does on that input.

Beam search is the standard algorithm as Hugging Face transformers implements it (keep the 2·beams best
continuations per step; finished hypotheses ranked by score / length^length_penalty; the same
early-stopping rule), so that on identical weights the outputs are identical. Two of its defaults are
not the paper's mathematics and are options here instead: `length_penalty` defaults to 0 (rank by
log p(y|x) itself; HF's 1.0 divides by the length), and nothing is forced at the maximum length (HF's
BART config forces </s> there). A generator whose answers start with a format token (BART's <s>) has it
forced, not scored: y is the answer after it (HF's RAG-Sequence likewise excludes the <s> score).

Provenance. Every `Decoded` carries the posterior over its k passages: RAG-Token, p(z|x,y_≤i) ∝
p_η(z|x) p_θ(y_i|x,z,y_<i) for every generated token (T,k); RAG-Sequence, p(z|x,y) ∝ p_η(z|x) p_θ(y|x,z)
(k,) — under fast decoding with its own approximation (passages whose beam did not produce y get 0);
concatenation and Fusion-in-Decoder, none: an empty posterior (0,), since no passage is inferred.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from latentrag.defaults import MAX_NEW_TOKENS
from latentrag.errors import LatentRagError
from latentrag.generation.generators import DecodeState, Generator, GeneratorBatch
from latentrag.generation.interrupt import checkpoint
from latentrag.marginals import sequence_posterior, token_posterior

NEG = -1.0e9  # "impossible" score for bookkeeping (as HF's beam search): finite, so sums stay ordered
RESCORE_ELEMENTS = 1 << 25  # logits held at once when re-scoring (rows · positions · vocabulary)

OnToken = Callable[[int, Tensor, Tensor], None]
"""on_token(step, token_ids (B,), posterior (B,k)): greedy RAG-Token's report after each step — the token
each question chose (−1 for a question whose answer had already ended) and p(z|x,y_≤step) over its k
passages, equal to row `step` of the final `Decoded.posterior`. An exception raised here stops decoding."""


@dataclass
class DecodeOptions:
    """How to search. max/min_new_tokens count answer tokens (</s> included, a forced <s> not).

    length_penalty: finished hypotheses are ranked by log-score / length^length_penalty (0: by the
    log-probability itself, the paper's objective; HF's default is 1.0). early_stopping: False (stop when
    no running beam can beat the worst kept hypothesis, estimated at the current length, as HF), True (stop
    once `num_beams` hypotheses are finished) or "never" (estimate at the maximum length when
    length_penalty > 0).
    """

    max_new_tokens: int = MAX_NEW_TOKENS
    min_new_tokens: int = 0
    num_beams: int = 4
    length_penalty: float = 0.0
    early_stopping: bool | str = False

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise LatentRagError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise LatentRagError(f"min_new_tokens must be between 0 and max_new_tokens, got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise LatentRagError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.early_stopping not in (True, False, "never"):
            raise LatentRagError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass
class Decoded:
    """One answer with what provenance needs (k passages, T generated tokens, </s> included).

    score: log p(y|x) under the model that decoded it (fast decoding: its approximation).
    posterior: RAG-Token (T,k) p(z|x,y_≤i) per token; RAG-Sequence (k,) p(z|x,y); concatenation and
    Fusion-in-Decoder (0,), empty (no latent passage).
    token_logprobs: (k,T) log p_θ(y_i|x,z,y_<i) under every passage, where it was computed (RAG-Token,
    thorough RAG-Sequence); doc_log_likelihood: (k,) log p_θ(y|x,z) for RAG-Sequence (−inf where fast
    decoding takes it as 0).
    """

    token_ids: list[int]
    score: float
    posterior: Tensor
    token_logprobs: Tensor | None = None
    doc_log_likelihood: Tensor | None = None
    candidates: int = 1


@dataclass
class Hypotheses:
    """Search results for G groups × n hypotheses (best first). tokens (G,n,T), raw (G,n) sum of scored
    log-probs, lengths (G,n), docs (G,n,T,r) per-row log-probs of the chosen tokens (r = scorer.rows: k
    under RAG-Token, 1 under RAG-Sequence: the row's own per-token terms, which thorough decoding reuses)."""

    tokens: Tensor
    raw: Tensor
    lengths: Tensor
    docs: Tensor

    def get(self, g: int, i: int) -> tuple[list[int], float, Tensor]:
        n = int(self.lengths[g, i])
        return self.tokens[g, i, :n].tolist(), float(self.raw[g, i]), self.docs[g, i, :n]


class TokenMarginal:
    """RAG-Token: a beam owns k rows (one per passage); its next-token scores are the marginal p'."""

    def __init__(self, log_prior: Tensor):
        self.log_prior = log_prior  # (G,k)
        self.rows = log_prior.shape[1]

    def __call__(self, logprobs: Tensor, groups: int, beams: int) -> tuple[Tensor, Tensor]:
        per_doc = logprobs.view(groups, beams, self.rows, -1)  # (G,n,k,V)
        return marginal_logprobs(self.log_prior, per_doc), per_doc


UNDERFLOW = -60.0  # below this, a probability-space sum is recomputed in log space


def marginal_logprobs(log_prior: Tensor, per_doc: Tensor) -> Tensor:
    """log p'(v|x,y_<i) = logsumexp_z [log p_η(z|x) + log p_θ(v|x,z,y_<i)] for every v. (G,k),(G,n,k,V)->(G,n,V).

    Every term is a probability (≤ 1), so the sum is taken in probability space, one contraction that is
    several times faster than `logsumexp`'s passes; entries small enough to lose precision there
    (p' < e^-60) are recomputed exactly with `logsumexp`. Same values as `rag_token_log_marginal`.
    """
    weights = log_prior.exp()[:, None, None, :].expand(-1, per_doc.shape[1], 1, -1)  # (G,n,1,k)
    out = torch.matmul(weights, per_doc.exp()).squeeze(2).log_()  # a (1,k)·(k,V) product per beam: no transpose
    low = out < UNDERFLOW
    if bool(low.any()):
        g, n, v = low.nonzero(as_tuple=True)
        out[g, n, v] = torch.logsumexp(per_doc[g, n, :, v] + log_prior[g], dim=-1)
    return out


def ban_eos(beam_lp: Tensor, eos: int) -> Tensor:
    """The scores with </s> impossible (before min_new_tokens), as a new tensor: `beam_lp` may be a view of
    log-probs the caller keeps (RAG-Sequence re-uses the first step's for teacher forcing)."""
    return beam_lp.index_fill(-1, torch.tensor([eos], device=beam_lp.device), float("-inf"))


class PerDocument:
    """RAG-Sequence: one search per (question, passage); a beam is one row and scores with p_θ(·|x,z).
    (Concatenation and FiD use it too, with one row per question: p_θ(·|x,z_1..z_k).)"""

    rows = 1

    def __call__(self, logprobs: Tensor, groups: int, beams: int) -> tuple[Tensor, Tensor]:
        return logprobs.view(groups, beams, -1), logprobs.view(groups, beams, 1, -1)


def start_answers(generator: Generator, batch: GeneratorBatch) -> tuple[DecodeState, Tensor]:
    """Read the inputs once and feed the forced answer prefix: state and log-probs of answer token 1 (N,V)."""
    return generator.start(batch, generator.answer_prefix)


def greedy_search(generator: Generator, state: DecodeState, logprobs: Tensor, scorer, groups: int,
            opts: DecodeOptions, on_token: OnToken | None = None) -> Hypotheses:
    """Argmax of the group's next-token scores at every step; finished groups are fed padding (as HF).

    on_token (RAG-Token scorer only): called after every step, see `OnToken`."""
    eos, pad, steps, r = generator.eos_token_id, generator.pad_token_id, opts.max_new_tokens, scorer.rows
    device = logprobs.device
    tokens = torch.full((groups, steps), pad, dtype=torch.long, device=device)
    docs = torch.zeros(groups, steps, r, device=device)
    score = torch.zeros(groups, device=device)
    lengths = torch.full((groups,), steps, dtype=torch.long, device=device)
    finished = torch.zeros(groups, dtype=torch.bool, device=device)
    for t in range(steps):
        checkpoint()
        beam_lp, per_doc = scorer(logprobs, groups, 1)
        beam_lp = beam_lp[:, 0]
        if t < opts.min_new_tokens:
            beam_lp = ban_eos(beam_lp, eos)
        best = torch.where(finished, pad, beam_lp.argmax(-1))
        score += torch.where(finished, 0.0, beam_lp.gather(1, best[:, None]).squeeze(1))
        tokens[:, t] = best
        docs[:, t] = per_doc[:, 0].gather(-1, best.view(groups, 1, 1).expand(groups, r, 1)).squeeze(-1)
        if on_token is not None:  # p(z|x,y_≤t) of this step's tokens: the rows `token_posterior` gives at the end
            on_token(t, torch.where(finished, -1, best), torch.softmax(scorer.log_prior + docs[:, t], dim=-1))
        done = ~finished & (best == eos)
        lengths[done] = t + 1
        finished |= done
        if bool(finished.all()) or t + 1 == steps:
            break
        state, logprobs = generator.step(state, best.repeat_interleave(r))
    return Hypotheses(tokens[:, None], score[:, None], lengths[:, None], docs[:, None])


def beam_search(generator: Generator, state: DecodeState, logprobs: Tensor, scorer, groups: int,
                 opts: DecodeOptions) -> Hypotheses:
    """Beam search for G groups at once, `num_beams` hypotheses each (HF's algorithm, vectorised).

    `logprobs` (G·r, V) are the first step's, from a single live beam per group: the first step expands to
    `num_beams` beams (HF runs its other beams at score −1e9 until then; the result is the same).
    """
    eos, pad, steps, r = generator.eos_token_id, generator.pad_token_id, opts.max_new_tokens, scorer.rows
    nb, lp_pow = opts.num_beams, opts.length_penalty
    offset = len(generator.answer_prefix)  # HF's lengths count a forced <s>; same here for the penalty
    device = logprobs.device
    arange_g, arange_r = torch.arange(groups, device=device), torch.arange(r, device=device)

    run_tok = torch.full((groups, 1, steps), pad, dtype=torch.long, device=device)
    run_score = torch.zeros(groups, 1, device=device)
    run_docs = torch.zeros(groups, 1, steps, r, device=device)
    fin_tok = torch.full((groups, nb, steps), pad, dtype=torch.long, device=device)
    fin_norm = torch.full((groups, nb), NEG, device=device)
    fin_raw = torch.full((groups, nb), NEG, device=device)
    fin_len = torch.ones(groups, nb, dtype=torch.long, device=device)
    fin_docs = torch.zeros(groups, nb, steps, r, device=device)
    is_fin = torch.zeros(groups, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(groups, 1, dtype=torch.bool, device=device)

    def take(t: Tensor, index: Tensor) -> Tensor:  # gather along the beam axis (dim 1)
        return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))

    for t in range(steps):
        checkpoint()
        n = run_tok.shape[1]
        beam_lp, per_doc = scorer(logprobs, groups, n)  # (G,n,V), (G,n,r,V)
        vocab = beam_lp.shape[-1]
        if t < opts.min_new_tokens:
            beam_lp = ban_eos(beam_lp, eos)
        acc = (beam_lp + run_score[:, :, None]).view(groups, n * vocab)
        top_s, top_i = acc.topk(min(2 * nb, n * vocab), dim=1)  # (G,K)
        src, tok = top_i // vocab, top_i % vocab
        cand_tok = take(run_tok, src)
        cand_tok[:, :, t] = tok
        cand_docs = take(run_docs, src)
        flat = (src * r * vocab + tok)[..., None] + arange_r * vocab  # (G,K,r) into (G, n·r·V)
        cand_docs[:, :, t] = per_doc.reshape(groups, -1).gather(1, flat.view(groups, -1)).view(flat.shape)
        hits = (tok == eos) if t + 1 < steps else torch.ones_like(tok, dtype=torch.bool)

        # finished: only the best `nb` candidates may finish; a group that cannot improve takes no more
        eligible = hits.clone()
        eligible[:, nb:] = False
        norm = top_s / float(t + 1 + offset) ** lp_pow
        if opts.early_stopping is True:
            norm = norm + is_fin.all(1, keepdim=True).float() * NEG
        norm = norm + (~improvable).float() * NEG + (~eligible).float() * NEG
        keep = torch.cat([fin_norm, norm], 1).topk(nb, dim=1).indices
        fin_norm = torch.cat([fin_norm, norm], 1).gather(1, keep)
        fin_raw = torch.cat([fin_raw, top_s], 1).gather(1, keep)
        fin_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1).gather(1, keep)
        fin_tok = take(torch.cat([fin_tok, cand_tok], 1), keep)
        fin_docs = take(torch.cat([fin_docs, cand_docs], 1), keep)
        is_fin = torch.cat([is_fin, eligible], 1).gather(1, keep)

        # running: the best `nb` candidates that did not stop
        masked = top_s + hits.float() * NEG
        nxt = masked.topk(nb, dim=1).indices
        run_tok, run_score, run_docs = take(cand_tok, nxt), masked.gather(1, nxt), take(cand_docs, nxt)
        run_src = src.gather(1, nxt)  # (G,nb) beam each continues

        length = (steps if opts.early_stopping == "never" and lp_pow > 0 else t + 1) + offset
        best = run_score[:, :1] / float(length) ** lp_pow
        worst = torch.where(is_fin, fin_norm.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best > worst).any(1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()) or (opts.early_stopping is True and bool(is_fin.all())):
            break
        rows = (((arange_g[:, None] * n + run_src)[..., None]) * r + arange_r).view(-1)  # (G·nb·r,)
        if n != nb or not torch.equal(rows, torch.arange(rows.numel(), device=device)):
            state = generator.select(state, rows, same_context=n == nb)
        state, logprobs = generator.step(state, run_tok[:, :, t].reshape(-1).repeat_interleave(r))
    return Hypotheses(fin_tok, fin_raw, fin_len, fin_docs)


def search(generator, state, logprobs, scorer, groups, opts, on_token: OnToken | None = None) -> Hypotheses:
    if opts.num_beams == 1:  # HF: one beam is greedy search
        return greedy_search(generator, state, logprobs, scorer, groups, opts, on_token)
    if on_token is not None:
        raise LatentRagError("tokens can be reported as they are decoded only by greedy search (num_beams=1)")
    return beam_search(generator, state, logprobs, scorer, groups, opts)


@torch.inference_mode()
def rag_token_decode(generator: Generator, batch: GeneratorBatch, log_prior: Tensor,
                     opts: DecodeOptions | None = None, on_token: OnToken | None = None) -> list[Decoded]:
    """RAG-Token greedy (num_beams=1) or beam search over p'(y_i|x,y_<i). log_prior (B,k) -> B answers.

    on_token (greedy only): called after every step with the B tokens chosen and their posteriors, so a
    caller can stream an answer with its provenance while it is decoded (see `OnToken`)."""
    opts = opts or DecodeOptions()
    opts.check()
    log_prior = log_prior.float()
    bsz = log_prior.shape[0]
    checkpoint()
    state, logprobs = start_answers(generator, batch)
    hyps = search(generator, state, logprobs, TokenMarginal(log_prior), bsz, opts, on_token)
    out = []
    for b in range(bsz):
        ids, score, docs = hyps.get(b, 0)  # docs (T,k)
        lp = docs.T.contiguous()  # (k,T)
        out.append(Decoded(ids, score, token_posterior(log_prior[b : b + 1], lp[None])[0], token_logprobs=lp))
    return out


def rag_token_greedy(generator: Generator, batch: GeneratorBatch, log_prior: Tensor,
                     max_new_tokens: int = MAX_NEW_TOKENS,
                     min_new_tokens: int = 0, on_token: OnToken | None = None) -> list[Decoded]:
    """Greedy RAG-Token decoding: at each step the argmax of the marginal p'(y_i|x,y_<i)."""
    return rag_token_decode(generator, batch, log_prior, DecodeOptions(max_new_tokens, min_new_tokens, 1), on_token)


def teacher_forced_logprobs(generator: Generator, state: DecodeState, first: Tensor, rows: Tensor,
                            tokens: Tensor) -> Tensor:
    """log p_θ(y_t|x,z,y_<t) of given continuations from a decoded prefix, in batched passes.

    state/first: the prefix state of N rows and its next-token log-probs (N,V); rows (R,) which prefix row
    each continuation reads; tokens (R,T). Returns (R,T) (positions after a continuation's end are junk:
    mask them). The prefix is not recomputed: its cache is selected per row (chunked to bound memory).
    """
    out = first.index_select(0, rows).gather(1, tokens[:, :1])
    if tokens.shape[1] == 1:
        return out
    chunk = max(1, RESCORE_ELEMENTS // ((tokens.shape[1] - 1) * first.shape[-1]))
    rest = []
    for start in range(0, len(rows), chunk):
        checkpoint()
        sl = slice(start, start + chunk)
        sub = generator.select(state, rows[sl])
        _, lp = generator.step(sub, tokens[sl, :-1])  # (r,T-1,V)
        rest.append(lp.gather(2, tokens[sl, 1:, None]).squeeze(2))
    return torch.cat([out, torch.cat(rest, 0)], 1)


@dataclass
class Candidate:
    """One RAG-Sequence answer hypothesis: log p_θ(y|x,z) (k,) and its per-token terms (k,T); −inf / 0 where
    not (yet) computed."""

    doc_ll: Tensor
    token_lp: Tensor

    @classmethod
    def empty(cls, k: int, length: int, device) -> Candidate:
        return cls(torch.full((k,), float("-inf"), device=device), torch.zeros(k, length, device=device))


@torch.inference_mode()
def rag_sequence_decode(generator: Generator, batch: GeneratorBatch, log_prior: Tensor,
                        opts: DecodeOptions | None = None, method: str = "thorough") -> list[Decoded]:
    """RAG-Sequence: beams under each passage, then thorough (score every candidate under every passage)
    or fast (p(y|x,z) ≈ 0 where y is not in z's beam).

    Thorough runs the extra forward passes only for the (y, z) pairs the beams did not score, as the paper
    describes: a hypothesis that came out of z's beam already carries log p_θ(y|x,z) (and its per-token
    terms) from the search itself.
    """
    if method not in ("thorough", "fast"):
        raise LatentRagError(f"RAG-Sequence decodes 'thorough' or 'fast', got '{method}'")
    opts = opts or DecodeOptions()
    opts.check()
    log_prior = log_prior.float()
    bsz, k = log_prior.shape
    checkpoint()
    state0, first = start_answers(generator, batch)  # N = B·k rows
    search_state = generator.fork(state0) if method == "thorough" else state0
    hyps = search(generator, search_state, first, PerDocument(), bsz * k, opts)
    n_hyp = hyps.tokens.shape[1]

    # the union of the k beams of each question, deduplicated (first occurrence kept: doc-major, best first),
    # with log p_θ(y|x,z) and its per-token terms for the passages whose beam produced y (fast: the only ones)
    cands: list[dict[tuple[int, ...], Candidate]] = []
    for b in range(bsz):
        seen: dict[tuple[int, ...], Candidate] = {}
        for j in range(k):
            for i in range(n_hyp):
                if float(hyps.raw[b * k + j, i]) <= NEG / 2:
                    continue  # an empty slot (fewer finished hypotheses than beams)
                ids, raw, docs = hyps.get(b * k + j, i)
                cand = seen.setdefault(tuple(ids), Candidate.empty(k, len(ids), log_prior.device))
                if raw > cand.doc_ll[j]:
                    cand.doc_ll[j], cand.token_lp[j] = raw, docs[:, 0]
        cands.append(seen)

    if method == "thorough":  # score the missing (y, z) pairs in one batched teacher-forced pass
        pairs = [(b, j, key, cand) for b, c in enumerate(cands) for key, cand in c.items()
                 for j in range(k) if cand.doc_ll[j] == float("-inf")]
        if pairs:
            width = max(len(key) for _, _, key, _ in pairs)
            toks = torch.full((len(pairs), width), generator.pad_token_id, dtype=torch.long, device=first.device)
            for p, (_, _, key, _) in enumerate(pairs):
                toks[p, : len(key)] = torch.tensor(key)
            rows = torch.tensor([b * k + j for b, j, _, _ in pairs], device=first.device)
            lp = teacher_forced_logprobs(generator, state0, first, rows, toks)
            for p, (_, j, key, cand) in enumerate(pairs):
                cand.token_lp[j] = lp[p, : len(key)]
                cand.doc_ll[j] = lp[p, : len(key)].sum()

    out = []
    for b in range(bsz):
        doc_ll = torch.stack([c.doc_ll for c in cands[b].values()])  # (C,k)
        scores = torch.logsumexp(log_prior[b] + doc_ll, dim=-1)  # (C,) log Σ_z p(z|x) p(y|x,z)
        best = int(scores.argmax())
        ids, cand = list(cands[b].items())[best]
        out.append(Decoded(
            list(ids), float(scores[best]), sequence_posterior(log_prior[b], cand.doc_ll),
            token_logprobs=cand.token_lp if method == "thorough" else None, doc_log_likelihood=cand.doc_ll,
            candidates=len(cands[b]),
        ))
    return out



@torch.inference_mode()
def reader_decode(generator: Generator, batch: GeneratorBatch, opts: DecodeOptions | None = None) -> list[Decoded]:
    """Concatenation and Fusion-in-Decoder: greedy (num_beams=1) or beam search over p_θ(y|x,z_1..z_k), one
    search per question, on a batch that reads all k passages in one row per question (`prepare_concat`,
    `prepare_fused`). Each `Decoded` has the score log p_θ(y|x,z_1..z_k), its per-token terms (1,T) and an
    empty posterior (0,)."""
    opts = opts or DecodeOptions()
    opts.check()
    state, first = start_answers(generator, batch)
    groups = first.shape[0]  # one row per question
    hyps = search(generator, state, first, PerDocument(), groups, opts)
    out = []
    for b in range(groups):
        ids, score, docs = hyps.get(b, 0)  # docs (T,1)
        out.append(Decoded(ids, score, docs.new_zeros(0), token_logprobs=docs.T.contiguous()))
    return out
