"""Resolving what a server answers with: the default model and index, built and cached on first use.

Library functions a CLI and a server both call (issue 11 §7). `ensure_default_index` builds the bundled
wiki-leads index with `build_index` directly (the CLI's version goes through its argparse command).
"""

from __future__ import annotations

from pathlib import Path

from latentrag.errors import LatentRagError
from latentrag.retrieval.index import MANIFEST

DEFAULT_INDEX = "wiki-leads-minilm-flat"  # the bundled corpus with the bundled MiniLM tower, exact search
TRAINED_MODEL = "rag-default"  # where a trained default model is saved under the cache's models/


def default_indexes_root() -> Path:
    from latentrag.assets import cache_dir

    return cache_dir() / "indexes"


def trained_model_dir() -> Path | None:
    """The trained default model (a saved RagModel under the cache), if one has been saved there."""
    from latentrag.assets import cache_dir
    from latentrag.model import CONFIG_FILE

    directory = cache_dir() / "models" / TRAINED_MODEL
    return directory if (directory / CONFIG_FILE).is_file() else None


def ensure_default_index(progress: bool = True) -> Path:
    """The bundled wiki-leads index under the default root, built once (with a progress bar) and cached."""
    directory = default_indexes_root() / DEFAULT_INDEX
    if not (directory / MANIFEST).exists():
        from latentrag.retrieval.corpus import read_corpus, split_passages
        from latentrag.retrieval.encoders import DenseEncoder, freeze
        from latentrag.retrieval.index import build_index

        encoder = freeze(DenseEncoder.from_pretrained("minilm"))
        build_index(split_passages(read_corpus("wiki-leads"), words=100), encoder, directory, index_type="flat",
                    progress=progress, corpus="wiki-leads", passage_words=100, encoder_source="minilm")
    return directory


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
            ensure_default_index()
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
