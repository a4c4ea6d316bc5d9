"""The paper's mathematics, in one place: small pure functions in log space, batched over documents.

Notation (Lewis et al., 2020, §2): x the input, z a retrieved passage (the latent variable), y the output
of N tokens. Shapes: B questions, k retrieved passages each, T target positions, V vocabulary.

    (1) retriever        p_η(z|x) ∝ exp(s · d(z)ᵀ q(x))                 (softmax over the top-k; s = 1 in the paper)
    (2) RAG-Sequence     p(y|x) ≈ Σ_z p_η(z|x) Π_i p_θ(y_i | x, z, y_<i)
    (3) RAG-Token        p(y|x) ≈ Π_i Σ_z p_η(z|x) p_θ(y_i | x, z, y_<i)
    (4) training loss    L = Σ_j −log p(y_j | x_j)                       (we report the batch mean)
    (5) one reading      p(y|x) = Π_i p_θ(y_i | x, z_1..z_k, y_<i)        (concatenation, Fusion-in-Decoder)

(5) is not the paper's: the k passages are read together (one prompt, or one decoder over k encodings),
so there is no latent variable, no sum over z, and p_η(z|x) appears nowhere in the likelihood: only the
top-k selection, which has no gradient, connects the answer to the retriever.

Every product is a sum of logs and every sum of probabilities a `logsumexp`: nothing here multiplies
probabilities, so 100-token answers under 50 passages do not underflow. Padding positions carry
`mask == 0` (any dtype: bool, int or float) and contribute log 1 = 0. They are removed with
`masked_fill`, never by multiplying by the mask: a padded position may hold −inf (a generator that
bans tokens, a logit masked to −inf), and 0·(−inf) is NaN. Where a padded position would reach a
`logsumexp` over documents (RAG-Token), its log-probs are replaced by 0 *before* the sum, so the
backward pass stays finite too (logsumexp's gradient at an all −inf input is NaN, even times 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def retrieval_log_prior(scores: Tensor) -> Tensor:
    """Eq. (1): log p_η(z|x) = s·d(z)ᵀq(x) − logsumexp over the top-k. scores (B,k) -> (B,k).

    The scores arrive already scaled: s = exp(log_scale) is the retriever's (1 = the paper's form, right for
    un-normalised towers such as DPR; unit-vector towers need s > 1 for p(z|x) to be far from uniform)."""
    return torch.log_softmax(scores, dim=-1)


def gather_targets(vocab_logprobs: Tensor, targets: Tensor) -> Tensor:
    """log p_θ(y_i | x, z, y_<i) of the target token. vocab_logprobs (B,k,T,V), targets (B,T) -> (B,k,T)."""
    index = targets.unsqueeze(1).expand(-1, vocab_logprobs.shape[1], -1).unsqueeze(-1)
    return vocab_logprobs.gather(-1, index).squeeze(-1)


def padding(mask: Tensor) -> Tensor:
    """The positions to drop: True where mask == 0. mask (B,T) of any dtype -> bool (B,T)."""
    return mask == 0


def sequence_log_likelihood(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log p_θ(y | x, z) = Σ_i log p_θ(y_i | x, z, y_<i), per document. (B,k,T), mask (B,T) -> (B,k)."""
    return token_logprobs.masked_fill(padding(mask).unsqueeze(1), 0.0).sum(-1)


def rag_sequence_log_likelihood(log_prior: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Eq. (2): log p(y|x) = logsumexp_z [ log p_η(z|x) + Σ_i log p_θ(y_i|x,z,y_<i) ]. -> (B,)"""
    return torch.logsumexp(log_prior + sequence_log_likelihood(token_logprobs, mask), dim=1)


def rag_token_log_marginal(log_prior: Tensor, logprobs: Tensor) -> Tensor:
    """Eq. (3)'s inner sum: log p'(y_i|x,y_<i) = logsumexp_z [ log p_η(z|x) + log p_θ(y_i|x,z,y_<i) ].

    Works on any trailing shape: logprobs (B,k,...) -> (B,...). With a vocabulary axis last it is the
    per-token transition distribution that RAG-Token's beam search decodes with.
    """
    prior = log_prior.reshape(*log_prior.shape, *([1] * (logprobs.dim() - 2)))
    return torch.logsumexp(prior + logprobs, dim=1)


def rag_token_log_likelihood(log_prior: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Eq. (3): log p(y|x) = Σ_i logsumexp_z [ log p_η(z|x) + log p_θ(y_i|x,z,y_<i) ]. -> (B,)"""
    pad = padding(mask)
    marginal = rag_token_log_marginal(log_prior, token_logprobs.masked_fill(pad.unsqueeze(1), 0.0))
    return marginal.masked_fill(pad, 0.0).sum(-1)


def smoothed_nll(log_likelihood: Tensor, smooth_log_sum: Tensor, epsilon: float, vocab_size: int) -> Tensor:
    """Label-smoothed negative log-likelihood per example: (1−ε)·(−log p(y|x)) + (ε/V)·(−Σ_v log p(v|·)).

    ε = 0 gives eq. (4)'s −log p(y|x) exactly. The smoothing term is the uniform target scored by
    the same marginalisation as y (the formulation of the paper's released implementation).
    """
    nll = -log_likelihood
    if epsilon == 0.0:
        return nll
    return (1.0 - epsilon) * nll - (epsilon / vocab_size) * smooth_log_sum


def rag_sequence_loss(
    log_prior: Tensor, vocab_logprobs: Tensor, targets: Tensor, mask: Tensor, epsilon: float = 0.0
) -> Tensor:
    """Eq. (4) under RAG-Sequence, per example (B,), with optional label smoothing ε.

    The smoothing term is logsumexp_z [ V·log p_η(z|x) + Σ_i Σ_v log p_θ(v|x,z,y_<i) ]: each of the V
    entries of the uniform target carries the document prior once, as y's own term does (HF's
    `RagSequenceForGeneration.get_nll` adds log p_η(z|x) to every vocabulary entry, then sums over V).

    What it does to the prior: with the prior counted V times (V ≈ 50k), documents' terms differ by
    V·Δlog p_η — thousands of nats for a prior gap of 0.1 — so the logsumexp over documents is in effect
    a hard max, the term of the single document maximising V·log p_η(z|x) + Σ_i Σ_v log p_θ (almost
    always the top-prior one). Its gradient raises that document's log-prior with weight ε: smoothing
    sharpens the retrieval distribution towards its mode; it does not spread mass over the k documents.
    """
    ll = rag_sequence_log_likelihood(log_prior, gather_targets(vocab_logprobs, targets), mask)
    if epsilon == 0.0:
        return -ll
    vocab = vocab_logprobs.shape[-1]
    smooth_per_doc = vocab_logprobs.sum(-1).masked_fill(padding(mask).unsqueeze(1), 0.0).sum(-1)  # (B,k)
    smooth = torch.logsumexp(vocab * log_prior + smooth_per_doc, dim=1)
    return smoothed_nll(ll, smooth, epsilon, vocab)


def rag_token_loss(
    log_prior: Tensor, vocab_logprobs: Tensor, targets: Tensor, mask: Tensor, epsilon: float = 0.0
) -> Tensor:
    """Eq. (4) under RAG-Token, per example (B,): ordinary label smoothing of the per-token marginal p'."""
    pad = padding(mask)
    marginal = rag_token_log_marginal(log_prior, vocab_logprobs.masked_fill(pad[:, None, :, None], 0.0))  # (B,T,V)
    ll = marginal.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(pad, 0.0).sum(-1)
    if epsilon == 0.0:
        return -ll
    smooth = marginal.sum(-1).masked_fill(pad, 0.0).sum(-1)
    return smoothed_nll(ll, smooth, epsilon, marginal.shape[-1])


def reader_log_likelihood(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Eq. (5): log p_θ(y | x, z_1..z_k) = Σ_i log p_θ(y_i | x, z_1..z_k, y_<i). token_logprobs (B,1,T) -> (B,)
    (one reading per question: the k axis of the other kinds has length 1)."""
    return sequence_log_likelihood(token_logprobs, mask)[:, 0]


def reader_loss(vocab_logprobs: Tensor, targets: Tensor, mask: Tensor, epsilon: float = 0.0) -> Tensor:
    """Eq. (5)'s −log p_θ(y | x, z_1..z_k) per example (B,), with ordinary label smoothing ε: the generator's
    own loss on the one input that holds all k passages. vocab_logprobs (B,1,T,V), targets/mask (B,T)."""
    if vocab_logprobs.shape[1] != 1:
        raise ValueError(f"one reading per question expected (B,1,T,V), got {tuple(vocab_logprobs.shape)}")
    logprobs = vocab_logprobs[:, 0].masked_fill(padding(mask).unsqueeze(-1), 0.0)  # (B,T,V)
    ll = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)
    if epsilon == 0.0:
        return -ll
    return smoothed_nll(ll, logprobs.sum((-1, -2)), epsilon, logprobs.shape[-1])


def sequence_posterior(log_prior: Tensor, seq_log_likelihood: Tensor) -> Tensor:
    """Provenance for RAG-Sequence: p(z|x,y) ∝ p_η(z|x) p_θ(y|x,z) (Bayes' rule). (B,k),(B,k) -> (B,k)."""
    return torch.softmax(log_prior + seq_log_likelihood, dim=-1)


def answer_posterior(log_prior: Tensor, token_logprobs: Tensor) -> Tensor:
    """Attribution of a whole answer: p(z|x,y) ∝ p_η(z|x) Π_i p_θ(y_i|x,z,y_<i), the passage that best explains
    all of y read alone. RAG-Sequence's posterior (eq. 1's latent); for RAG-Token, whose latent is drawn per
    token, the same Bayes rule over one-passage explanations of y. (…,k),(…,k,T) -> (…,k)."""
    return sequence_posterior(log_prior, token_logprobs.sum(-1))


def token_posterior(log_prior: Tensor, token_logprobs: Tensor) -> Tensor:
    """Provenance for RAG-Token: p(z|x,y_≤i) ∝ p_η(z|x) p_θ(y_i|x,z,y_<i). (B,k),(B,k,T) -> (B,T,k)."""
    return torch.softmax(log_prior.unsqueeze(-1) + token_logprobs, dim=1).transpose(1, 2)
