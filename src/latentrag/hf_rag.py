"""Hugging Face RAG checkpoints (`facebook/rag-token-nq`, `facebook/rag-sequence-nq`, or any
`RagTokenForGeneration` / `RagSequenceForGeneration` `save_pretrained` folder) as a latentrag `RagModel`.

What carries over, read from the checkpoint rather than assumed:

* the question encoder q(x) (DPR; its pooler output, unnormalised, so p_η(z|x) ∝ exp(d(z)ᵀq(x)) with scale 1
  as in eq. (1)) and its tokenizer (`question_encoder_tokenizer/`);
* the generator p_θ (BART) and its tokenizer (`generator_tokenizer/`);
* `n_docs` -> k, `label_smoothing`, `max_combined_length` -> the generator's input length, the title and
  document separators and the generator config's `prefix`;
* the mode from the checkpoint's class: RagTokenForGeneration -> "token" (eq. 3), RagSequence… -> "sequence"
  (eq. 2);
* the generator's view of the question: HF's RagRetriever gives the generator the question encoder's
  decoded tokens (lower-cased by DPR's uncased BERT); the loaded generator does the same.

A RAG checkpoint holds no document tower. The index must come from the tower the published vectors were
made with (`facebook/dpr-ctx_encoder-single-nq-base` for the NQ models' wiki_dpr "nq" embeddings);
`document_encoder` names it and its identity is computed as `latentrag index import --encoder-name` does,
so the retriever refuses an index from any other tower.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentrag.errors import LatentRagError

MODES = {"RagTokenForGeneration": "token", "RagSequenceForGeneration": "sequence"}
TOKENIZER_DIRS = ("question_encoder_tokenizer", "generator_tokenizer")
DEFAULT_DOCUMENT_ENCODER = "facebook/dpr-ctx_encoder-single-nq-base"


def hf_rag_config(name_or_path: str | Path):
    """The checkpoint's transformers RagConfig if `name_or_path` is a HF RAG checkpoint (folder or hub name), else None."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            return None
        try:
            if json.loads(config_file.read_text()).get("model_type") != "rag":
                return None
        except (json.JSONDecodeError, OSError):
            return None
    elif path.exists() or str(name_or_path).count("/") != 1:
        return None  # a file, or not of the hub's "owner/name" form
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else str(name_or_path))
    except (OSError, ValueError):
        return None
    return config if config.model_type == "rag" else None


def checkpoint_mode(config) -> str:
    """'token' or 'sequence' from the checkpoint's class."""
    for arch in config.architectures or []:
        if arch in MODES:
            return MODES[arch]
    raise LatentRagError(
        f"the RAG checkpoint's architectures {config.architectures} name neither RagTokenForGeneration nor "
        "RagSequenceForGeneration (a bare RagModel has no generator head): save a *ForGeneration model"
    )


class RagCheckpoint:
    """An opened Hugging Face RAG checkpoint: its config, mode and the two parts as latentrag builds them."""

    def __init__(self, source: str, config, hf, tokenizers):
        self.source, self.config, self.mode = source, config, checkpoint_mode(config)
        self._hf, self._tokenizers = hf, tokenizers

    def question_encoder(self, max_length: int = 256):
        """The DPR question tower q(x): its pooler output, unnormalised (eq. 1 with scale 1)."""
        from latentrag.retrieval.encoders import DenseEncoder

        tokenizer = self._tokenizers.question_encoder
        return DenseEncoder(self._hf.rag.question_encoder, tokenizer, "pooler", False,
                            min(max_length, tokenizer.model_max_length), f"{self.source}#question_encoder")

    def generator(self, max_input_length: int | None = None):
        """The BART generator reading the checkpoint's input format: separators, prefix, and the question as
        the question tokenizer decodes it (as HF's RagRetriever gives it)."""
        from latentrag.generation.generators import Seq2SeqGenerator

        generator = Seq2SeqGenerator(self._hf.rag.generator, self._tokenizers.generator, f"{self.source}#generator",
                                     max_input_length or self.config.max_combined_length)
        generator.configure_input(self.config.title_sep, self.config.doc_sep, None, self._tokenizers.question_encoder)
        return generator


def open_checkpoint(name_or_path: str | Path) -> RagCheckpoint:
    """Load a HF RAG checkpoint (folder or hub name), refusing what latentrag cannot run as it was trained."""
    import transformers

    source = str(name_or_path)
    config = hf_rag_config(source)
    if config is None:
        raise LatentRagError(f"{source} is not a Hugging Face RAG checkpoint (no config.json with model_type 'rag')")
    mode = checkpoint_mode(config)
    model_class = getattr(transformers, "RagTokenForGeneration" if mode == "token" else "RagSequenceForGeneration")
    missing = [sub for sub in TOKENIZER_DIRS if Path(source).is_dir() and not (Path(source) / sub).is_dir()]
    if missing:  # transformers would build empty tokenizers instead of failing
        raise LatentRagError(f"{source} has no {' or '.join(missing)}: save the tokenizers with "
                             "RagTokenizer.save_pretrained into the checkpoint folder")
    try:
        hf = model_class.from_pretrained(source)
        tokenizers = transformers.RagTokenizer.from_pretrained(source)
    except OSError as e:
        raise LatentRagError(
            f"cannot load the RAG checkpoint {source}: {e}. A folder needs the model (save_pretrained) and "
            "RagTokenizer.save_pretrained's question_encoder_tokenizer/ and generator_tokenizer/"
        ) from e
    hf.eval()
    if config.question_encoder.model_type != "dpr":
        raise LatentRagError(f"{source}: question encoder of type {config.question_encoder.model_type}; only DPR "
                             "question encoders (pooler output) are supported")
    if not hf.rag.generator.config.is_encoder_decoder:
        raise LatentRagError(f"{source}: the generator is not an encoder-decoder model")
    for tok, part in ((tokenizers.question_encoder, "question encoder"), (tokenizers.generator, "generator")):
        if len(tok) <= len(tok.all_special_ids):
            raise LatentRagError(f"{source}: the {part} tokenizer holds only special tokens; save the tokenizers "
                                 "with RagTokenizer.save_pretrained")
    return RagCheckpoint(source, config, hf, tokenizers)


def load_hf_rag(name_or_path: str | Path, index=None, document_encoder: str | None = None, max_length: int = 256,
                **overrides):
    """A RagModel from a HF RAG checkpoint; `index` as for `RagModel.from_pretrained`; `overrides` (RagConfig
    fields: mode, k, label_smoothing, max_input_length, ...) replace what the checkpoint says, at construction.

    document_encoder: the document tower the index's vectors came from (name or folder; default
    facebook/dpr-ctx_encoder-single-nq-base, the NQ models' wiki_dpr embeddings). max_length: the question
    tower's token limit. Each part records the checkpoint as its base (`latentrag.saving.Base`), so a model
    trained from it saves as adapters over it (or in full) and loads again from anywhere.
    """
    from dataclasses import replace

    from latentrag.model import RagConfig, RagModel, check_overrides
    from latentrag.retrieval.index.importers import document_encoder_identity
    from latentrag.retrieval.retriever import Retriever
    from latentrag.saving import Base, PartDescription, load_part

    check_overrides(overrides)
    cache: dict = {}
    base = Base.named(name_or_path)
    cache[base.name] = checkpoint = open_checkpoint(base.name)
    config = checkpoint.config
    query_encoder = load_part("query_encoder", PartDescription(base=replace(base, component="question_encoder"),
                                                               settings={"max_length": max_length}), cache=cache)
    generator = load_part("generator", PartDescription(base=replace(base, component="generator")), cache=cache,
                          max_input_length=overrides.get("max_input_length", config.max_combined_length),
                          prompt=overrides.get("prompt"))
    document_encoder = Base.named(document_encoder or DEFAULT_DOCUMENT_ENCODER).name
    identity = document_encoder_identity(document_encoder, query_encoder.dim)
    rag_config = RagConfig(
        query_encoder=f"{base.name}#question_encoder", document_encoder=document_encoder,
        generator=f"{base.name}#generator", mode=checkpoint.mode, k=config.n_docs,
        label_smoothing=float(config.label_smoothing), max_input_length=config.max_combined_length,
        document_encoder_identity=identity,
    )
    rag_config = replace(rag_config, **overrides)
    model = RagModel(Retriever(query_encoder, identity, scale=rag_config.retrieval_scale,
                               learn_scale=rag_config.learn_retrieval_scale), generator, rag_config)
    if index is not None:
        model.swap_index(index)
    return model
