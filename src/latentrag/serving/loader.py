"""Resolving what a server answers with: the default model and index, built and cached on first use.

The bundled index is resolved and built by the library (`latentrag.retrieval.index.default_index`, as the
CLI does); what is the server's own is the indexes root (a folder of index folders, named by folder name)
(the model is `loading.load_model`'s: a folder, the shipped trained default, or "base").
"""

from __future__ import annotations

from pathlib import Path

from latentrag.errors import LatentRagError
from latentrag.retrieval.index import MANIFEST

DEFAULT_INDEX = "wiki-leads-minilm-flat"  # = default_index().name: the bundled corpus and tower, exact search


def default_indexes_root() -> Path:
    """The cache's indexes folder, where `latentrag index build` puts indexes by default."""
    from latentrag.assets import default_index_dir

    return default_index_dir().parent


def load_service(model_dir: str | Path | None = None, index: str | None = None,
                 indexes_root: str | Path | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
                 model=None, *, ray: bool = False, address: str | None = None,
                 document_encoder: str | None = None, limits=None):
    """A `RagService` over the model and the index `index` (a folder name under `indexes_root`).

    Without a root, the cache's indexes folder (the bundled index is built there if missing); without an
    index name, the bundled one if present, else the only index under the root. With `ray`, every index is
    opened as a sharded one searched by Ray actors (`loading.open_index`) on the cluster at `address`.
    document_encoder: for a Hugging Face RAG checkpoint, the tower its index's vectors came from.
    """
    from functools import partial

    from latentrag.loading import open_index
    from latentrag.serving.service import RagService

    if indexes_root is None:
        root = default_indexes_root()
        if index is None or index == DEFAULT_INDEX:
            from latentrag.retrieval.index import default_index

            root = default_index().parent  # built once into the cache
    else:
        root = Path(indexes_root).expanduser()
    if index is None:
        names = sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []
        if DEFAULT_INDEX in names:
            index = DEFAULT_INDEX
        elif len(names) == 1:
            index = names[0]
        else:
            raise LatentRagError(f"{len(names)} indexes under {root}: choose one with --index NAME "
                                 f"({', '.join(names) or 'build one with `latentrag index build --out ROOT/NAME`'})")
    if model is None:
        from latentrag.loading import load_bare_model

        model = load_bare_model(model_dir, document_encoder=document_encoder)  # the service opens and checks the index by name
    return RagService(model, root, index, max_batch=max_batch, max_wait_ms=max_wait_ms, limits=limits,
                      open_index=partial(open_index, progress=False, ray=ray, address=address))
