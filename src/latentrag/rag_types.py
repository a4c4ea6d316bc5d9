"""The paper's two models as two small types with one interface: each owns its likelihood, loss,
decoding and provenance, so RAG-Sequence and RAG-Token sit side by side (cf. ParlAI's model_types).
"""

from __future__ import annotations

from torch import Tensor

from latentrag import marginals
from latentrag.decoding import Decoded, rag_token_greedy
from latentrag.errors import LatentRagError
from latentrag.generators import Generator, GeneratorBatch


class RagType:
    name: str
    decodings: tuple[str, ...] = ()

    def log_likelihood(self, log_prior: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
        """log p(y|x) per example (B,)."""
        raise NotImplementedError

    def loss(self, log_prior: Tensor, vocab_logprobs: Tensor, targets: Tensor, mask: Tensor, epsilon: float) -> Tensor:
        """−log p(y|x) per example (B,), label-smoothed by ε."""
        raise NotImplementedError

    def posterior(self, log_prior: Tensor, token_logprobs: Tensor, mask: Tensor) -> Tensor:
        """Which passage the answer came from, given the answer."""
        raise NotImplementedError

    def decode(self, generator: Generator, batch: GeneratorBatch, log_prior: Tensor, decoding: str, **kw) -> list[Decoded]:
        raise NotImplementedError

    def check_decoding(self, decoding: str) -> None:
        if decoding not in self.decodings:
            raise LatentRagError(
                f"RAG-{self.name.title()} decodes with {', '.join(self.decodings)}; got '{decoding}'"
            )


class RagSequence(RagType):
    """Eq. (2): one passage per answer. Provenance: p(z|x,y) over the whole answer."""

    name = "sequence"
    decodings = ()

    def log_likelihood(self, log_prior, token_logprobs, mask):
        return marginals.rag_sequence_log_likelihood(log_prior, token_logprobs, mask)

    def loss(self, log_prior, vocab_logprobs, targets, mask, epsilon):
        return marginals.rag_sequence_loss(log_prior, vocab_logprobs, targets, mask, epsilon)

    def posterior(self, log_prior, token_logprobs, mask):
        """(B,k): p(z|x,y) ∝ p_η(z|x) p_θ(y|x,z)."""
        return marginals.sequence_posterior(log_prior, marginals.sequence_log_likelihood(token_logprobs, mask))

    def decode(self, generator, batch, log_prior, decoding, **kw):
        self.check_decoding(decoding)
        raise LatentRagError("RAG-Sequence decoding is not available in this version; use mode='token'")


class RagToken(RagType):
    """Eq. (3): a passage per token. Provenance: p(z|x,y_≤i) for every generated token."""

    name = "token"
    decodings = ("greedy",)

    def log_likelihood(self, log_prior, token_logprobs, mask):
        return marginals.rag_token_log_likelihood(log_prior, token_logprobs, mask)

    def loss(self, log_prior, vocab_logprobs, targets, mask, epsilon):
        return marginals.rag_token_loss(log_prior, vocab_logprobs, targets, mask, epsilon)

    def posterior(self, log_prior, token_logprobs, mask):
        """(B,T,k): p(z|x,y_≤i) ∝ p_η(z|x) p_θ(y_i|x,z,y_<i)."""
        return marginals.token_posterior(log_prior, token_logprobs)

    def decode(self, generator, batch, log_prior, decoding, max_new_tokens=32, min_new_tokens=0, **kw):
        self.check_decoding(decoding)
        return rag_token_greedy(generator, batch, log_prior, max_new_tokens, min_new_tokens)


RAG_TYPES: dict[str, RagType] = {"sequence": RagSequence(), "token": RagToken()}


def rag_type(mode: str) -> RagType:
    try:
        return RAG_TYPES[mode]
    except KeyError:
        raise LatentRagError(f"unknown mode '{mode}': choose 'token' (RAG-Token) or 'sequence' (RAG-Sequence)") from None
