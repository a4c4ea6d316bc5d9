"""`RagModel` = retriever p_η(z|x) + generator p_θ(y_i|x,z,y_<i), with passages as a latent variable.

    model = RagModel.from_components(query_encoder="minilm", generator="smollm2", index="~/.cache/...")
    model.loss(questions, answers, mode="token")            # −mean log p(y|x), eq. (3)/(4)
    model.loss(questions, answers, mode="concat")           # or: all k passages in one input, no latent variable
    model.generate(questions, mode="token")                  # answers with their evidence
    model.swap_index(new_index_dir)                          # new knowledge, no retraining

    retrieved = model.retrieve(questions, k=20)              # retrieve once (here, or on another machine)
    model.generate(questions, retrieved=retrieved.top(5))    # ... and answer from those passages

The model pickles and deep-copies (the index re-opens from its folder), for Ray actors and spawned workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from latentrag.assets import BASE_MODEL, DEFAULT_ENCODER, DEFAULT_GENERATOR, trained_default_dir
from latentrag.defaults import DEFAULT_K, MAX_NEW_TOKENS
from latentrag.errors import LatentRagError
from latentrag.generation.generators import Generator
from latentrag.rag_types import DEFAULT_NUM_BEAMS, rag_type
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.encoders import DenseEncoder, freeze
from latentrag.retrieval.index import DenseIndex
from latentrag.retrieval.retriever import RetrievedBatch, Retriever, check_questions
from latentrag.retrieval.searcher import Searcher


@dataclass(frozen=True)
class RagConfig:
    """Plain values with defaults: what to build a RagModel from and how to run it. Frozen: a built model's
    settings change only by building it again with overrides (`from_components`, `from_pretrained`)."""

    query_encoder: str = DEFAULT_ENCODER
    document_encoder: str = DEFAULT_ENCODER  # the frozen tower that builds indexes this model can use
    generator: str = DEFAULT_GENERATOR
    mode: str = "token"  # "token" (RAG-Token), "sequence" (RAG-Sequence), "concat" or "fid" (`rag_types`)
    k: int = DEFAULT_K
    label_smoothing: float = 0.0
    max_new_tokens: int = MAX_NEW_TOKENS
    num_beams: int = DEFAULT_NUM_BEAMS  # beams of 'beam', 'thorough' and 'fast' decoding (greedy uses one)
    max_input_length: int = 512
    prompt: str = "full"  # a decoder-only generator's prompt style: "full" or "compact" (`DecoderOnlyGenerator`)
    retrieval_scale: float = 1.0  # s in p(z|x) ∝ exp(s · d(z)ᵀq(x)); 1 = the paper's eq. (1); saved as learned
    learn_retrieval_scale: bool = False  # train s (as log s) with the query tower
    document_encoder_identity: dict = field(default_factory=dict)


def check_overrides(overrides: dict) -> None:
    """Refuse keyword overrides that are not RagConfig fields."""
    known = {f.name for f in fields(RagConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise LatentRagError(f"unknown RagConfig field(s) {', '.join(unknown)}: choose from {', '.join(sorted(known))}")


@dataclass
class Answer:
    """An answer that shows its evidence: the passages with p(z|x), and the posterior given the answer.

    doc_probs: p(z|x), the retriever's distribution over the k passages, whatever the mode (under
    concatenation and Fusion-in-Decoder it only chose and ordered them: the reader does not weight by it).
    posterior: RAG-Sequence — p(z|x,y) per passage; RAG-Token — p(z|x,y_≤i) per passage for every
    generated token (a list of k-lists, aligned with `tokens`); concatenation and Fusion-in-Decoder — an
    empty list (every passage was read at once: there is no latent passage to infer). evidence: p(z|x,y) for the
    whole answer (`marginals.answer_posterior`; RAG-Sequence: its posterior), empty where there is no latent
    passage or no per-passage likelihood was computed. log_prob: log p(y|x)
    (under fast RAG-Sequence decoding, its approximation p(y|x,z) ≈ 0 for passages whose beam did not
    produce y; concatenation and FiD: log p_θ(y|x,z_1..z_k)).
    """

    question: str
    text: str
    mode: str
    passages: list[Passage]
    doc_probs: list[float]
    posterior: list
    tokens: list[str]
    log_prob: float
    decoding: str = ""
    evidence: list[float] = field(default_factory=list)

    def evidence_passage(self) -> Passage | None:
        """The passage with the highest p(z|x,y) over the whole answer (`marginals.answer_posterior`), or None
        when the mode has no latent passage (concatenation, Fusion-in-Decoder)."""
        if not self.evidence:
            return None
        return self.passages[max(range(len(self.evidence)), key=self.evidence.__getitem__)]

    def to_json(self) -> dict:
        return {
            "question": self.question,
            "answer": self.text,
            "mode": self.mode,
            "decoding": self.decoding,
            "log_prob": self.log_prob,
            "tokens": self.tokens,
            "passages": [
                {"id": p.id, "title": p.title, "text": p.text, "probability": prob}
                for p, prob in zip(self.passages, self.doc_probs, strict=True)
            ],
            "posterior": self.posterior,
            "evidence": self.evidence,
        }


def _evidence(mode: str, log_prior: torch.Tensor, decoded) -> list[float]:
    """The answer-level posterior p(z|x,y) of one decoded answer (see `Answer.evidence`)."""
    from latentrag.marginals import answer_posterior

    if mode == "sequence":
        return decoded.posterior.tolist()
    if mode == "token" and decoded.token_logprobs is not None:
        return answer_posterior(log_prior, decoded.token_logprobs.float()).tolist()
    return []


class RagModel(nn.Module):
    """Retriever p_η(z|x) + generator p_θ(y_i|x,z,y_<i) + the frozen document tower d(z) that built the index.

    `document_tower` is a registered child (in `state_dict()`, carried by `.to()` and DDP) that is None
    until loaded (`document_encoder()`; only index building needs it). It stays frozen: it receives no
    gradients, `train()` leaves it in eval mode and `requires_grad_()` leaves it without gradients, and
    `save_pretrained` does not save it (the config names it and records its identity).
    """

    def __init__(self, retriever: Retriever, generator: Generator, config: RagConfig,
                 document_tower: DenseEncoder | None = None):
        super().__init__()
        self.retriever, self.generator, self.config = retriever, generator, config
        self.register_module("document_tower", None if document_tower is None else freeze(document_tower))

    def train(self, mode: bool = True) -> RagModel:
        """Training mode for the query tower and the generator; the frozen document tower stays in eval."""
        super().train(mode)
        if self.document_tower is not None:
            self.document_tower.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> RagModel:
        """As nn.Module's, except that the frozen document tower never requires gradients, and the retrieval
        scale only when the config learns it."""
        super().requires_grad_(requires_grad)
        if self.document_tower is not None:
            self.document_tower.requires_grad_(False)
        self.retriever.log_scale.requires_grad_(requires_grad and self.config.learn_retrieval_scale)
        return self

    def set_trainable(self, generator: int | None = 0, query_encoder: int | None = 0,
                      retrieval_scale: bool | None = None) -> RagModel:
        """Choose what trains and freeze the rest. Each part trains fully (0), through new rank-r LoRA adapters
        (r ≥ 1: only they train; `save_pretrained` then saves just them over the part's base), or not at all
        (None); the retrieval scale when `retrieval_scale` (default: when the config learns it). The document
        tower never trains. A freshly built or loaded model trains everything but the document tower, as
        `set_trainable()` with its defaults."""
        from latentrag.adapters import add_lora

        for part, rank in ((self.generator, generator), (self.retriever.query_encoder, query_encoder)):
            part.requires_grad_(rank == 0)  # the generator's adapters first: a seed draws the same adapters as before
            if rank:
                add_lora(part.model, rank)
        learn = self.config.learn_retrieval_scale if retrieval_scale is None else retrieval_scale
        self.retriever.log_scale.requires_grad_(learn)
        return self

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_components(
        cls, index: str | Path | Searcher | None = None, config: RagConfig | None = None, **overrides
    ) -> RagModel:
        """Build from encoder/generator names or paths; by default the bundled MiniLM towers and SmolLM2.

        `overrides` (RagConfig fields) apply on top of `config` (or of the defaults): a copy is changed,
        never the caller's config. Each part records its base (`latentrag.saving.Base`: an existing folder as
        its absolute path), so a model trained from it saves as adapters over it and loads from anywhere.
        """
        from latentrag.saving import Base, PartDescription, load_part

        check_overrides(overrides)
        config = replace(config or RagConfig(), **overrides)
        bases = {role: Base.named(getattr(config, role)) for role in ("query_encoder", "generator")}
        config = replace(config, document_encoder=Base.named(config.document_encoder).name,
                         **{role: base.name for role, base in bases.items()})
        query_encoder = load_part("query_encoder", PartDescription(base=bases["query_encoder"]))
        generator = load_part("generator", PartDescription(base=bases["generator"]),
                              max_input_length=config.max_input_length, prompt=config.prompt)
        return cls.assemble(config, query_encoder, generator, index)

    @classmethod
    def assemble(cls, config: RagConfig, query_encoder: DenseEncoder, generator: Generator,
                 index: str | Path | Searcher | None = None) -> RagModel:
        """The model of loaded parts under `config`: its retriever, and the document tower when the config does
        not yet record the one the index pairs with (a new model pairs with the tower its config names)."""
        rag_type(config.mode).check_generator(generator)  # a 'fid' config needs a seq2seq generator
        document_tower = None
        if not config.document_encoder_identity:
            document_tower = freeze(DenseEncoder.from_pretrained(config.document_encoder))
            config = replace(config, document_encoder_identity=document_tower.identity())
        retriever = Retriever(query_encoder, config.document_encoder_identity, scale=config.retrieval_scale,
                              learn_scale=config.learn_retrieval_scale)
        model = cls(retriever, generator, config, document_tower)
        if index is not None:
            model.swap_index(index)
        return model

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, index: str | Path | Searcher | None = None,
                        document_encoder: str | None = None, **overrides) -> RagModel:
        """Load a saved model (`latentrag.saving`: what the folder holds), or a Hugging Face RAG checkpoint
        (folder or hub name; see `latentrag.hf_rag`, whose `document_encoder` names the tower that made the
        index's vectors). No directory: the shipped fine-tuned default (`assets.trained_default_dir()`); "base":
        the bundled towers and generator as they ship, untrained. `overrides` (RagConfig fields: mode, k,
        label_smoothing, max_input_length, retrieval_scale, ...) replace the saved values while the model is built.

        Parts saved as LoRA adapters are their base with the adapters folded into the weights (base-model speed).
        Whatever the saved form, the query tower and the generator come back trainable (every parameter
        requires gradients; `set_trainable` or `requires_grad_` decide from there)."""
        from latentrag import hf_rag, saving

        if directory is None:
            directory = trained_default_dir() or BASE_MODEL
        if str(directory) == BASE_MODEL:
            return cls.from_components(index=index, config=RagConfig(), **overrides)
        path = Path(directory).expanduser() / saving.CONFIG_FILE
        if not path.exists() and hf_rag.hf_rag_config(directory) is not None:
            return hf_rag.load_hf_rag(directory, index=index, document_encoder=document_encoder, **overrides)
        if not path.exists():
            raise LatentRagError(
                f"{directory} is not a saved latentrag model (no {saving.CONFIG_FILE}), nor a Hugging Face RAG "
                "checkpoint"
            )
        if document_encoder is not None:
            raise LatentRagError(f"{directory} is a saved latentrag model: it names its own document encoder "
                                 "(document_encoder= is for Hugging Face RAG checkpoints)")
        return saving.load_folder(directory, index=index, **overrides)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model (`latentrag.saving`): its config, a description of each part, and each part — as LoRA
        adapters alone over a portable base (a bundled asset, a hub name, an absolute folder) when it trains
        through adapters, else as its full weights. The config carries the retrieval scale as it is now."""
        from latentrag import saving

        saving.save_folder(self, directory)

    def parts(self) -> tuple[tuple[str, nn.Module], ...]:
        """(name, module) of the parts a saved model holds: the query tower and the generator."""
        return (("query_encoder", self.retriever.query_encoder), ("generator", self.generator))

    def document_encoder(self) -> DenseEncoder:
        """The frozen document tower (loaded on first use, on the query tower's device: only index building
        needs it)."""
        if self.document_tower is None:
            tower = freeze(DenseEncoder.from_pretrained(self.config.document_encoder))
            self.document_tower = tower.to(self.retriever.query_encoder.device)
        return self.document_tower

    def swap_index(self, index: str | Path | Searcher) -> None:
        """Replace the knowledge without retraining (paper §4.5): later calls use the new index. A path opens
        a `DenseIndex`; any `Searcher` (a Ray shard fan-out, an imported index) is used as it is."""
        self.retriever.swap_index(DenseIndex.load(index) if isinstance(index, (str, Path)) else index)

    # ---- likelihood and loss ------------------------------------------------------------------------
    def _check(self, mode: str | None, k: int | None) -> tuple[str, int]:
        mode, k = mode or self.config.mode, self.config.k if k is None else k
        rag_type(mode).check_generator(self.generator)
        if k < 1:
            raise LatentRagError(f"k must be at least 1, got {k}")
        return mode, k

    def retrieve(self, questions: list[str], k: int | None = None) -> RetrievedBatch:
        return self.retriever.retrieve(questions, self.config.k if k is None else k)

    def _retrieved(self, questions: list[str] | str, k: int | None, retrieved: RetrievedBatch | None) -> RetrievedBatch:
        """`retrieved` cut to k (its own k when k is None), checked against the questions; else retrieve."""
        if retrieved is None:
            return self.retrieve(questions if isinstance(questions, list) else [questions], k)
        if not isinstance(retrieved, RetrievedBatch):
            raise LatentRagError(f"retrieved must be a RetrievedBatch (from model.retrieve), got {type(retrieved).__name__}")
        if check_questions(questions) != retrieved.questions:
            raise LatentRagError("the retrieved batch was retrieved for other questions: pass the same questions")
        return retrieved if k is None else retrieved.top(k)

    def forward(self, questions: list[str], answers: list[str], mode: str | None = None, k: int | None = None,
                epsilon: float | None = None, retrieved: RetrievedBatch | None = None) -> Tensor:
        """−log p(y|x) per question (B,), differentiable through the generator and (RAG-Token, RAG-Sequence) the
        query tower; concatenation and Fusion-in-Decoder give −log p_θ(y|x,z_1..z_k), where p(z|x) is not.

        `retrieved` (from `retrieve`, here or elsewhere) skips retrieval: its first k passages are used (all
        of them when k is None); gradients reach the query tower through its scores if they carry any.
        """
        mode, k = self._check(mode, k if retrieved is None or k is not None else retrieved.k)
        if len(answers) != len(questions):
            raise LatentRagError(f"{len(questions)} questions but {len(answers)} answers")
        self.generator.check_prompt_budget(questions)
        retrieved = self._retrieved(questions, k, retrieved)
        kind = rag_type(mode)
        batch = kind.prepare(self.generator, retrieved.questions, retrieved.passages, answers)  # warns if cut
        vocab_logprobs = kind.vocab_logprobs(self.generator, batch)
        eps = self.config.label_smoothing if epsilon is None else epsilon
        return kind.loss(retrieved.log_prior, vocab_logprobs, batch.targets, batch.target_mask.float(), eps)

    def loss(self, questions: list[str], answers: list[str], mode: str | None = None, k: int | None = None,
             epsilon: float | None = None, retrieved: RetrievedBatch | None = None) -> Tensor:
        """Eq. (4) averaged over the batch: −(1/B) Σ_j log p(y_j|x_j) (label-smoothed by ε if set)."""
        return self(questions, answers, mode, k, epsilon, retrieved).mean()

    # ---- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        questions: list[str] | str,
        mode: str | None = None,
        decoding: str | None = None,
        num_beams: int | None = None,
        k: int | None = None,
        max_new_tokens: int | None = None,
        retrieved: RetrievedBatch | None = None,
        on_token=None,
        **options,
    ) -> list[Answer]:
        """Answer each question; every answer carries its passages, p(z|x) and the posterior over them.

        mode 'token' decodes 'greedy' (default) or 'beam'; mode 'sequence' decodes 'thorough' (default) or
        'fast'; modes 'concat' and 'fid' (all k passages read at once, `latentrag.rag_types`) decode 'greedy'
        (default) or 'beam', and their answers carry p(z|x) and an empty posterior. num_beams defaults to 1 for greedy and to the config's `num_beams` otherwise; mode, k and
        max_new_tokens to the config's. `retrieved` (from `retrieve`) skips retrieval: its first k passages
        are used (all of them when k is None). options: min_new_tokens, length_penalty (0 = rank by
        log p(y|x); Hugging Face uses 1.0), early_stopping (see `latentrag.generation.decoding.DecodeOptions`).

        on_token: RAG-Token greedy only, called after every decoding step with the tokens and p(z|x,y_≤i)
        (`latentrag.generation.decoding.OnToken`), to stream.
        """
        mode, k = self._check(mode, k if retrieved is None or k is not None else retrieved.k)
        kind = rag_type(mode)
        decoding = decoding or kind.default_decoding
        if num_beams is None and decoding != "greedy":
            num_beams = self.config.num_beams
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens  # 0 is refused
        kind.options(decoding, num_beams, {**options, "max_new_tokens": max_new_tokens})  # before retrieving
        if on_token is not None:
            if (mode, decoding) != ("token", "greedy"):
                raise LatentRagError(f"tokens stream only from RAG-Token greedy decoding, not {mode}/{decoding}")
            options["on_token"] = on_token
        questions = questions if isinstance(questions, list) else [questions]
        self.generator.check_prompt_budget(questions)
        retrieved = self._retrieved(questions, k, retrieved)
        batch = kind.prepare(self.generator, retrieved.questions, retrieved.passages)  # warns if cut
        log_prior = retrieved.log_prior.float()
        decoded = kind.decode(
            self.generator, batch, log_prior, decoding, num_beams=num_beams, max_new_tokens=max_new_tokens, **options,
        )
        answers = []
        for b, d in enumerate(decoded):
            answers.append(
                Answer(
                    question=retrieved.questions[b],
                    text=self.generator.decode_tokens(d.token_ids),
                    mode=mode,
                    passages=retrieved.passages[b],
                    doc_probs=log_prior[b].exp().tolist(),
                    posterior=d.posterior.tolist(),
                    tokens=[self.generator.tokenizer.decode([t]) for t in d.token_ids],
                    log_prob=d.score,
                    decoding=decoding,
                    evidence=_evidence(mode, log_prior[b], d),
                )
            )
        return answers
