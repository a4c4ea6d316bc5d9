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


def load_hf_rag(name_or_path: str | Path, index=None, document_encoder: str | None = None, max_length: int = 256):
    """A RagModel from a HF RAG checkpoint; `index` as for `RagModel.from_pretrained`.

    document_encoder: the document tower the index's vectors came from (name or folder; default
    facebook/dpr-ctx_encoder-single-nq-base, the NQ models' wiki_dpr embeddings).
    """
    import transformers

    from latentrag.generation.generators import Seq2SeqGenerator
    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.encoders import DenseEncoder
    from latentrag.retrieval.index.importers import document_encoder_identity
    from latentrag.retrieval.retriever import Retriever

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
    question_model, generator_model = hf.rag.question_encoder, hf.rag.generator
    if config.question_encoder.model_type != "dpr":
        raise LatentRagError(f"{source}: question encoder of type {config.question_encoder.model_type}; only DPR "
                             "question encoders (pooler output) are supported")
    if not generator_model.config.is_encoder_decoder:
        raise LatentRagError(f"{source}: the generator is not an encoder-decoder model")
    q_tok, g_tok = tokenizers.question_encoder, tokenizers.generator
    for tok, part in ((q_tok, "question encoder"), (g_tok, "generator")):
        if len(tok) <= len(tok.all_special_ids):
            raise LatentRagError(f"{source}: the {part} tokenizer holds only special tokens; save the tokenizers "
                                 "with RagTokenizer.save_pretrained")
    query_encoder = DenseEncoder(question_model, q_tok, "pooler", False,
                                 min(max_length, q_tok.model_max_length), f"{source}#question_encoder")
    generator = Seq2SeqGenerator(generator_model, g_tok, f"{source}#generator", config.max_combined_length)
    generator.configure_input(config.title_sep, config.doc_sep, None, q_tok)
    document_encoder = document_encoder or DEFAULT_DOCUMENT_ENCODER
    identity = document_encoder_identity(document_encoder, query_encoder.dim)
    rag_config = RagConfig(
        query_encoder=f"{source}#question_encoder", document_encoder=document_encoder,
        generator=f"{source}#generator", mode=mode, k=config.n_docs, label_smoothing=float(config.label_smoothing),
        max_input_length=config.max_combined_length, document_encoder_identity=identity,
    )
    model = RagModel(Retriever(query_encoder, identity), generator, rag_config)
    if index is not None:
        model.swap_index(index)
    return model
