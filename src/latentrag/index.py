"""The dense index: document vectors d(z) in faiss for maximum inner product search (paper §2.2).

An index folder holds three files, each written atomically, the manifest last (its presence marks
a complete index):

    vectors.faiss     the faiss index (inner-product metric), memory-mapped on load when flat
    passages.arrow    the passage store (row i = faiss id i)
    manifest.json     document encoder identity, dimension, count, index type, latentrag version
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from latentrag.atomic import atomic_path, atomic_write_text
from latentrag.corpus import Passage, PassageStore, write_passage_store
from latentrag.encoders import DenseEncoder
from latentrag.errors import LatentRagError

MANIFEST, VECTORS, PASSAGES = "manifest.json", "vectors.faiss", "passages.arrow"

# Index types and their faiss factory strings (all with the inner-product metric).
INDEX_TYPES = {"flat": "Flat"}


@dataclass
class Manifest:
    encoder: dict
    dim: int
    count: int
    index_type: str
    factory: str
    version: str
    created: float = field(default_factory=time.time)
    params: dict = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.exists():
            raise LatentRagError(
                f"{directory} is not a latentrag index (no {MANIFEST}; an interrupted build leaves none): "
                "build one with `latentrag index build`"
            )
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise LatentRagError(f"{path}: unreadable manifest ({e})") from e

    def write(self, directory: Path) -> None:
        atomic_write_text(directory / MANIFEST, json.dumps(self.__dict__, indent=2))


class DenseIndex:
    """Top-k inner-product search over passages, with their stored vectors and texts."""

    def __init__(self, directory: Path, manifest: Manifest, index: faiss.Index, store: PassageStore):
        self.directory, self.manifest, self.faiss, self.store = directory, manifest, index, store

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.faiss.ntotal

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> DenseIndex:
        directory = Path(directory)
        manifest = Manifest.read(directory)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and manifest.index_type == "flat" else 0
        index = faiss.read_index(str(directory / VECTORS), flags)
        store = PassageStore(directory / PASSAGES)
        if index.ntotal != len(store) or index.d != manifest.dim:
            raise LatentRagError(
                f"{directory}: index holds {index.ntotal} vectors of dim {index.d} but the manifest/passages say "
                f"{manifest.count} of dim {manifest.dim}; rebuild it"
            )
        return cls(directory, manifest, index, store)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B,d) float32 -> scores (B,k), row ids (B,k), best first."""
        if not 1 <= k <= len(self):
            raise LatentRagError(f"k must be between 1 and the index size {len(self)}, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise LatentRagError(f"query vectors have shape {queries.shape}, the index expects (*, {self.dim})")
        return self.faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored document vectors d(z) for ids (B,k) -> (B,k,d)."""
        flat = self.faiss.reconstruct_batch(ids.reshape(-1).astype(np.int64))
        return flat.reshape(*ids.shape, self.dim)

    def passages(self, ids: np.ndarray) -> list[list[Passage]]:
        return [self.store.get(row) for row in ids.tolist()]


def build_index(
    passages: Iterable[Passage],
    encoder: DenseEncoder,
    directory: str | Path,
    index_type: str = "flat",
    batch_size: int = 64,
    progress: bool = True,
) -> DenseIndex:
    """Encode passages with the (frozen) document tower and write a complete index folder."""
    from latentrag import __version__

    if index_type not in INDEX_TYPES:
        raise LatentRagError(f"unknown index type '{index_type}': choose one of {', '.join(INDEX_TYPES)}")
    directory = Path(directory)
    passages = list(passages)
    if not passages:
        raise LatentRagError("the corpus holds no passages: nothing to index")
    (directory / MANIFEST).unlink(missing_ok=True)  # the old index is invalid from here until the new manifest
    directory.mkdir(parents=True, exist_ok=True)
    vectors = encoder.encode(
        [p.title for p in passages], [p.text for p in passages], batch_size=batch_size, progress=progress
    ).numpy()
    index = faiss.index_factory(encoder.dim, INDEX_TYPES[index_type], faiss.METRIC_INNER_PRODUCT)
    for start in tqdm(range(0, len(vectors), 65536), desc="indexing", disable=not progress):
        index.add(vectors[start : start + 65536])
    with atomic_path(directory / VECTORS) as tmp:
        faiss.write_index(index, str(tmp))
    write_passage_store(directory / PASSAGES, passages)
    Manifest(
        encoder=encoder.identity(),
        dim=encoder.dim,
        count=len(passages),
        index_type=index_type,
        factory=INDEX_TYPES[index_type],
        version=__version__,
    ).write(directory)
    return DenseIndex.load(directory)
