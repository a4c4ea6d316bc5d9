"""Four kinds of reader, one interface: each owns how it reads its k passages, its likelihood, loss,
decoding and provenance, so they sit side by side (cf. ParlAI's model_types).

    kind               reads the k passages                        p(y|x)                                  provenance
    RAG-Sequence       k inputs, one per passage; one passage      Σ_z p_η(z|x) Π_i p_θ(y_i|x,z,y_<i)      p(z|x,y)
                       per answer
    RAG-Token          k inputs; a passage per token               Π_i Σ_z p_η(z|x) p_θ(y_i|x,z,y_<i)      p(z|x,y_≤i)
    Concatenation      one input: question + z_1..z_k in           Π_i p_θ(y_i|x,z_1..z_k,y_<i)            none ([])
                       retrieval order, cut to the input budget
    Fusion-in-Decoder  k encoder inputs, encoded apart; their      Π_i p_θ(y_i|x,z_1..z_k,y_<i)            none ([])
                       states concatenated; one decoder (seq2seq)

The two RAG kinds are the paper's: the passage is a latent variable, p_η(z|x) is in the likelihood, and so
the query tower gets a gradient and every answer a posterior over its passages. Concatenation and
Fusion-in-Decoder (Izacard & Grave 2021) read all k passages at once: no latent variable, p_η(z|x) only
chooses and orders the top k (no gradient flows through that choice), and there is no posterior: their
answers carry p(z|x), the retriever's distribution over what was read, and an empty posterior list.
"""

from __future__ import annotations

from torch import Tensor

from latentrag import marginals
from latentrag.errors import LatentRagError
from latentrag.generation.decoding import (
    Decoded,
    DecodeOptions,
    rag_sequence_decode,
    rag_token_decode,
    reader_decode,
)
from latentrag.generation.generators import Generator, GeneratorBatch
from latentrag.retrieval.corpus import Passage

DEFAULT_NUM_BEAMS = 4  # beams of 'beam', 'thorough' and 'fast' when neither the call nor the model's config says


class RagType:
    name: str  # the mode, as every command takes it
    title: str  # as reports print it
    latent = True  # passages are a latent variable: p_η(z|x) is in the likelihood (the query tower trains)
    decodings: tuple[str, ...] = ()

    def check_generator(self, generator: Generator) -> None:
        """Refuse a generator this kind cannot read with (LatentRagError)."""

    def prepare(self, generator: Generator, questions: list[str], passages: list[list[Passage]],
                answers: list[str] | None = None) -> GeneratorBatch:
        """The generator's inputs for B questions and their k passages (warning, LatentRagWarning, about cut
        inputs): here one row per (question, passage), B·k rows, as both RAG kinds read them."""
        generator.warn_truncation(questions, passages)
        return generator.prepare(questions, passages, answers)

    def vocab_logprobs(self, generator: Generator, batch: GeneratorBatch) -> Tensor:
        """Teacher-forced log-probs over the vocabulary: (B, k, T, V) for the RAG kinds, (B, 1, T, V) for the
        kinds that read all passages at once."""
        return generator.vocab_logprobs(batch)

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
                f"{self.title} decodes with {', '.join(self.decodings)}; got '{decoding}'"
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
    title = "RAG-Sequence"
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
    title = "RAG-Token"
    decodings = ("greedy", "beam")

    def log_likelihood(self, log_prior, token_logprobs, mask):
        return marginals.rag_token_log_likelihood(log_prior, token_logprobs, mask)

    def loss(self, log_prior, vocab_logprobs, targets, mask, epsilon):
        return marginals.rag_token_loss(log_prior, vocab_logprobs, targets, mask, epsilon)

    def posterior(self, log_prior, token_logprobs, mask):
        """(B,T,k): p(z|x,y_≤i) ∝ p_η(z|x) p_θ(y_i|x,z,y_<i)."""
        return marginals.token_posterior(log_prior, token_logprobs)

    def decode(self, generator, batch, log_prior, decoding, num_beams=None, on_token=None, **options):
        """Greedy or beam search over the per-token marginal; each answer's posterior is p(z|x,y_≤i) (T,k).
        on_token: greedy's per-step report (`latentrag.generation.decoding.OnToken`)."""
        return rag_token_decode(generator, batch, log_prior, self.options(decoding, num_beams, options), on_token)


class OneReading(RagType):
    """Eq. (5): the k passages read together, p(y|x) = Π_i p_θ(y_i | x, z_1..z_k, y_<i). No latent variable:
    p_η(z|x) chooses and orders the top k but is not in the likelihood, so the loss gives the query tower
    no gradient (`latentrag.training` keeps it frozen). Provenance: none; the answer's `posterior` is an
    empty list and `doc_probs` the retriever's p(z|x) over the passages read. Decoding is the generator's
    own greedy or beam search over that one input."""

    latent = False
    decodings = ("greedy", "beam")

    def log_likelihood(self, log_prior, token_logprobs, mask):
        """log p_θ(y|x,z_1..z_k) (B,); log_prior is not used. token_logprobs (B,1,T)."""
        return marginals.reader_log_likelihood(token_logprobs, mask)

    def loss(self, log_prior, vocab_logprobs, targets, mask, epsilon):
        """−log p_θ(y|x,z_1..z_k) (B,), ordinary label smoothing; log_prior is not used."""
        return marginals.reader_loss(vocab_logprobs, targets, mask, epsilon)

    def posterior(self, log_prior, token_logprobs, mask):
        """(B,0): nothing to infer, the answer read every passage at once."""
        return log_prior.new_zeros(log_prior.shape[0], 0)

    def decode(self, generator, batch, log_prior, decoding, num_beams=None, **options):
        """Greedy or beam search over p_θ(y|x,z_1..z_k), one search per question; posterior (0,)."""
        return reader_decode(generator, batch, self.options(decoding, num_beams, options))


class Concatenation(OneReading):
    """One generator input per question: the question and its k passages in retrieval order (one prompt for a
    decoder-only generator, one encoder input for seq2seq), cut to `max_input_length` from the end of the
    lowest-ranked passages (`Generator.prepare_concat`, which warns when it cuts)."""

    name = "concat"
    title = "Concatenation"

    def prepare(self, generator, questions, passages, answers=None):
        return generator.prepare_concat(questions, passages, answers)


class FusionInDecoder(OneReading):
    """Fusion-in-Decoder (Izacard & Grave 2021), seq2seq generators only: each (question, passage) row is
    encoded on its own, as RAG's, within `max_input_length`; the k rows' encoder states are concatenated and
    one decoder cross-attends to all of them (`Seq2SeqGenerator.prepare_fused`)."""

    name = "fid"
    title = "Fusion-in-Decoder"

    def check_generator(self, generator):
        if generator.kind != "seq2seq":
            raise LatentRagError(
                f"mode 'fid' (Fusion-in-Decoder) needs an encoder-decoder generator (BART, T5) to fuse the k "
                f"passages' encodings; {generator.name} is {generator.kind}: use mode 'concat' to read all k "
                "passages in one prompt"
            )

    def prepare(self, generator, questions, passages, answers=None):
        self.check_generator(generator)
        generator.warn_truncation(questions, passages)
        return generator.prepare_fused(questions, passages, answers)


RAG_TYPES: dict[str, RagType] = {kind.name: kind for kind in (RagSequence(), RagToken(), Concatenation(),
                                                              FusionInDecoder())}
MODES = tuple(RAG_TYPES)  # every mode a command accepts: "sequence", "token", "concat", "fid"


def rag_type(mode: str) -> RagType:
    try:
        return RAG_TYPES[mode]
    except KeyError:
        raise LatentRagError(
            f"unknown mode '{mode}': choose 'token' (RAG-Token), 'sequence' (RAG-Sequence), 'concat' "
            "(all k passages in one input) or 'fid' (Fusion-in-Decoder, seq2seq generators)"
        ) from None
