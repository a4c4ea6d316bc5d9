"""One call from "what the user named" to a ready RagModel: a saved model folder or the bundled models,
over a given index folder or the bundled wiki-leads index (built once into the cache on first use)."""

from __future__ import annotations

from pathlib import Path


def load_model(model: str | Path | None = None, index: str | Path | None = None, progress: bool = True):
    """A RagModel from a `save_pretrained` folder (else the bundled MiniLM towers and SmolLM2), searching
    `index` (else `retrieval.index.default_index()`, built with a progress bar the first time)."""
    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.index import default_index

    index_dir = Path(index).expanduser() if index else default_index(progress=progress)
    if model:
        return RagModel.from_pretrained(model, index=index_dir)
    return RagModel.from_components(index=index_dir, config=RagConfig())
