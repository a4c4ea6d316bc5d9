"""Resolving what a server answers with: the default model and index, built and cached on first use.

The bundled index is resolved and built by the library (`latentrag.retrieval.index.default_index`, as the
CLI does); what is the server's own is the indexes root (a folder of index folders, named by folder name)
and the trained default model.
"""

from __future__ import annotations

from pathlib import Path

from latentrag.errors import LatentRagError
from latentrag.retrieval.index import MANIFEST

DEFAULT_INDEX = "wiki-leads-minilm-flat"  # = default_index().name: the bundled corpus and tower, exact search
TRAINED_MODEL = "rag-default"  # where a trained default model is saved under the cache's models/


def default_indexes_root() -> Path:
    """The cache's indexes folder, where `latentrag index build` puts indexes by default."""
    from latentrag.assets import default_index_dir

    return default_index_dir().parent


def trained_model_dir() -> Path | None:
    """The trained default model (a saved RagModel under the cache), if one has been saved there."""
    from latentrag.assets import cache_dir
    from latentrag.model import CONFIG_FILE

    directory = cache_dir() / "models" / TRAINED_MODEL
    return directory if (directory / CONFIG_FILE).is_file() else None


def load_default_model(model_dir: str | Path | None = None):
    """A saved model if given, else the trained default if there is one, else the bundled towers."""
    from latentrag.model import RagConfig, RagModel

    directory = model_dir or trained_model_dir()
    if directory is not None:
        return RagModel.from_pretrained(directory)
    return RagModel.from_components(config=RagConfig())


def load_service(model_dir: str | Path | None = None, index: str | None = None,
                 indexes_root: str | Path | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
                 model=None):
    """A `RagService` over the model and the index `index` (a folder name under `indexes_root`).

    Without a root, the cache's indexes folder (the bundled index is built there if missing); without an
    index name, the bundled one if present, else the only index under the root.
    """
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
    model = model if model is not None else load_default_model(model_dir)
    return RagService(model, root, index, max_batch=max_batch, max_wait_ms=max_wait_ms)
