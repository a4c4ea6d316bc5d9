"""Decoding the paper's two models (§2.5). RAG-Token decodes the per-token marginal
p'(y_i|x,y_<i) = Σ_z p_η(z|x) p_θ(y_i|x,z,y_<i) like any autoregressive model; every step runs all
B·k (question, passage) rows in one cached forward and marginalises in log space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentrag.generators import Generator, GeneratorBatch
from latentrag.marginals import rag_token_log_marginal


@dataclass
class Decoded:
    """One output sequence with what provenance needs.

    token_logprobs (k, T): log p_θ(y_i|x,z,y_<i) of each chosen token under each passage.
    score: log p(y|x) under the model that decoded it.
    """

    token_ids: list[int]
    token_logprobs: Tensor
    score: float


def rag_token_greedy(
    generator: Generator, batch: GeneratorBatch, log_prior: Tensor, max_new_tokens: int = 32, min_new_tokens: int = 0
) -> list[Decoded]:
    """Greedy RAG-Token decoding: at each step the argmax of the marginal p'(y_i|x,y_<i)."""
    bsz, k = log_prior.shape
    eos, pad = generator.eos_token_id, generator.pad_token_id
    state, logprobs = generator.start(batch)  # (B·k, V)
    finished = torch.zeros(bsz, dtype=torch.bool, device=log_prior.device)
    tokens: list[Tensor] = []
    per_doc: list[Tensor] = []
    score = torch.zeros(bsz, device=log_prior.device)
    for t in range(max_new_tokens):
        doc_logprobs = logprobs.view(bsz, k, -1)
        marginal = rag_token_log_marginal(log_prior, doc_logprobs)  # (B,V)
        if t < min_new_tokens:
            marginal[:, eos] = float("-inf")
        best = marginal.argmax(-1)
        best = torch.where(finished, torch.full_like(best, pad), best)
        score += torch.where(finished, 0.0, marginal.gather(-1, best[:, None]).squeeze(-1))
        tokens.append(best)
        per_doc.append(doc_logprobs.gather(-1, best.view(bsz, 1, 1).expand(bsz, k, 1)).squeeze(-1))
        finished |= best == eos
        if finished.all():
            break
        state, logprobs = generator.step(state, best.repeat_interleave(k))
    out = []
    ids = torch.stack(tokens, 1).tolist()
    lps = torch.stack(per_doc, 2)  # (B,k,T)
    for b in range(bsz):
        length = next((i + 1 for i, tok in enumerate(ids[b]) if tok == eos), len(ids[b]))
        out.append(Decoded(ids[b][:length], lps[b, :, :length], float(score[b])))
    return out
