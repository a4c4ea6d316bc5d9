"""The paper's two models as two small types with one interface: each owns its likelihood, loss,
decoding and provenance, so RAG-Sequence and RAG-Token sit side by side (cf. ParlAI's model_types).
"""

from __future__ import annotations

from torch import Tensor

from latentrag import marginals
from latentrag.errors import LatentRagError
from latentrag.generation.decoding import Decoded, DecodeOptions, rag_sequence_decode, rag_token_decode
from latentrag.generation.generators import Generator, GeneratorBatch

DEFAULT_NUM_BEAMS = 4  # beams of 'beam', 'thorough' and 'fast' when neither the call nor the model's config says


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

    def decode(self, generator: Generator, batch: GeneratorBatch, log_prior: Tensor, decoding: str,
               num_beams: int | None = None, **options) -> list[Decoded]:
        """Decode B answers with their provenance. options: DecodeOptions fields (max_new_tokens, ...)."""
        raise NotImplementedError

    @property
    def default_decoding(self) -> str:
        return self.decodings[0]

    def check_decoding(self, decoding: str) -> None:
        if decoding not in self.decodings:
            raise LatentRagError(
                f"RAG-{self.name.title()} decodes with {', '.join(self.decodings)}; got '{decoding}'"
            )

    def options(self, decoding: str, num_beams: int | None, options: dict) -> DecodeOptions:
        """DecodeOptions for `decoding`: greedy is one beam; the other decodings default to DEFAULT_NUM_BEAMS
        (`RagModel.generate` passes its config's `num_beams` instead)."""
        self.check_decoding(decoding)
        if decoding == "greedy":
            if num_beams not in (None, 1):
                raise LatentRagError(f"greedy decoding uses one beam, got num_beams={num_beams}: use 'beam'")
            num_beams = 1
        known = DecodeOptions.__dataclass_fields__
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise LatentRagError(f"unknown decoding option(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        opts = DecodeOptions(num_beams=DEFAULT_NUM_BEAMS if num_beams is None else num_beams,
                             **{key: value for key, value in options.items() if value is not None})
        opts.check()
        return opts


class RagSequence(RagType):
    """Eq. (2): one passage per answer. Provenance: p(z|x,y) over the whole answer."""

    name = "sequence"
    decodings = ("thorough", "fast")

    def log_likelihood(self, log_prior, token_logprobs, mask):
        return marginals.rag_sequence_log_likelihood(log_prior, token_logprobs, mask)

    def loss(self, log_prior, vocab_logprobs, targets, mask, epsilon):
        return marginals.rag_sequence_loss(log_prior, vocab_logprobs, targets, mask, epsilon)

    def posterior(self, log_prior, token_logprobs, mask):
        """(B,k): p(z|x,y) ∝ p_η(z|x) p_θ(y|x,z)."""
        return marginals.sequence_posterior(log_prior, marginals.sequence_log_likelihood(token_logprobs, mask))

    def decode(self, generator, batch, log_prior, decoding, num_beams=None, **options):
        """Beams under each passage; thorough re-scores every hypothesis under every passage, fast does not.
        Each answer's posterior is p(z|x,y) (k,)."""
        opts = self.options(decoding, num_beams, options)
        return rag_sequence_decode(generator, batch, log_prior, opts, method=decoding)


class RagToken(RagType):
    """Eq. (3): a passage per token. Provenance: p(z|x,y_≤i) for every generated token."""

    name = "token"
    decodings = ("greedy", "beam")

    def log_likelihood(self, log_prior, token_logprobs, mask):
        return marginals.rag_token_log_likelihood(log_prior, token_logprobs, mask)

    def loss(self, log_prior, vocab_logprobs, targets, mask, epsilon):
        return marginals.rag_token_loss(log_prior, vocab_logprobs, targets, mask, epsilon)

    def posterior(self, log_prior, token_logprobs, mask):
        """(B,T,k): p(z|x,y_≤i) ∝ p_η(z|x) p_θ(y_i|x,z,y_<i)."""
        return marginals.token_posterior(log_prior, token_logprobs)

    def decode(self, generator, batch, log_prior, decoding, num_beams=None, **options):
        """Greedy or beam search over the per-token marginal; each answer's posterior is p(z|x,y_≤i) (T,k)."""
        return rag_token_decode(generator, batch, log_prior, self.options(decoding, num_beams, options))


RAG_TYPES: dict[str, RagType] = {"sequence": RagSequence(), "token": RagToken()}


def rag_type(mode: str) -> RagType:
    try:
        return RAG_TYPES[mode]
    except KeyError:
        raise LatentRagError(f"unknown mode '{mode}': choose 'token' (RAG-Token) or 'sequence' (RAG-Sequence)") from None
