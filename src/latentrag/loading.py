"""One call from "what the user named" to a ready RagModel: a saved model folder, a Hugging Face RAG
checkpoint, the shipped fine-tuned default or (`"base"`) the bundled models as they ship, over a given index
folder or the bundled wiki-leads index (built once into the cache on first use)."""

from __future__ import annotations

from pathlib import Path


def open_index(index: str | Path | None = None, progress: bool = True, ray: bool = False,
               address: str | None = None):
    """The searcher over `index` (else the bundled default): a `DenseIndex` in this process, or with `ray` a
    `distributed.sharded.ShardedIndex`, one Ray actor per shard on the cluster at `address` (None: local)."""
    from latentrag.distributed.sharded import is_sharded
    from latentrag.errors import LatentRagError
    from latentrag.retrieval.index import DenseIndex, default_index

    index_dir = Path(index).expanduser() if index else default_index(progress=progress)
    if ray:
        from latentrag.distributed.sharded import ShardedIndex

        return ShardedIndex(index_dir, address=address)
    if is_sharded(index_dir):
        raise LatentRagError(f"{index_dir} is a sharded index: add --ray (and --address for a running cluster)")
    return DenseIndex.load(index_dir)


def load_model(model: str | Path | None = None, index: str | Path | None = None, progress: bool = True, *,
               ray: bool = False, address: str | None = None, document_encoder: str | None = None,
               device: str | None = None):
    """A RagModel from a `save_pretrained` folder or a Hugging Face RAG checkpoint (folder or hub name); by
    default the shipped fine-tuned model (`assets.trained_default_dir()`), and with "base" (or when no
    trained default ships) the bundled MiniLM towers and SmolLM2 as they are; searching `index` (else
    `retrieval.index.default_index()`, built with a progress bar the first time); with `ray` the index is a sharded one searched by Ray actors (see
    `open_index`). document_encoder: for a HF RAG checkpoint, the tower the index's vectors came from (see
    `latentrag.hf_rag`). device: a torch device to move the model to (e.g. "cuda")."""
    searcher = open_index(index, progress=progress, ray=ray, address=address)
    loaded = load_bare_model(model, document_encoder=document_encoder)
    loaded.swap_index(searcher)  # any searcher, checked against the query tower's document encoder
    if device and device != "cpu":
        import torch

        from latentrag.errors import LatentRagError

        try:
            loaded.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:
            raise LatentRagError(f"cannot move the model to device '{device}': {e}") from e
    return loaded


def load_bare_model(model: str | Path | None = None, document_encoder: str | None = None):
    """The model `load_model` resolves (a folder or hub name, the shipped trained default, or "base"), with
    no index yet: for a caller that chooses and checks the index itself (the service)."""
    from latentrag.model import RagModel

    extra = {"document_encoder": document_encoder} if document_encoder else {}
    return RagModel.from_pretrained(model or None, **extra)
