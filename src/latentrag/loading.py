"""One call from "what the user named" to a ready RagModel: a saved model folder or the bundled models,
over a given index folder or the bundled wiki-leads index (built once into the cache on first use)."""

from __future__ import annotations

from pathlib import Path


def load_model(model: str | Path | None = None, index: str | Path | None = None, progress: bool = True, *,
               document_encoder: str | None = None, device: str | None = None):
    """A RagModel from a `save_pretrained` folder or a Hugging Face RAG checkpoint (folder or hub name; else
    the bundled MiniLM towers and SmolLM2), searching `index` (else `retrieval.index.default_index()`, built
    with a progress bar the first time). document_encoder: for a HF RAG checkpoint, the tower the index's
    vectors came from (see `latentrag.hf_rag`). device: a torch device to move the model to (e.g. "cuda")."""
    from latentrag.errors import LatentRagError
    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.index import default_index

    index_dir = Path(index).expanduser() if index else default_index(progress=progress)
    if model:
        extra = {"document_encoder": document_encoder} if document_encoder else {}
        loaded = RagModel.from_pretrained(model, index=index_dir, **extra)
    else:
        loaded = RagModel.from_components(index=index_dir, config=RagConfig())
    if device and device != "cpu":
        import torch

        try:
            loaded.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:
            raise LatentRagError(f"cannot move the model to device '{device}': {e}") from e
    return loaded

