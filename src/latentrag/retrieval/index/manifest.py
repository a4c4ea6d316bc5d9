"""An index folder's files and its manifest: what built the vectors, how many, of what type.

An index folder holds:

    vectors.faiss     the faiss index (inner-product metric); flat and HNSW load memory-mapped
    vectors.npy       exact float32 vectors, only for types faiss cannot reconstruct exactly (SQ8, PQ);
                      memory-mapped, used to re-rank candidates and as d(z), so scores stay exact
    passages.arrow    the passage store (row i = faiss id i), memory-mapped
    manifest.json     document encoder identity (name, weights sha256), dimension, count, index type,
                      factory string and parameters, latentrag version
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from latentrag.atomic import atomic_write_text
from latentrag.errors import LatentRagError

MANIFEST, VECTORS, PASSAGES, EXACT = "manifest.json", "vectors.faiss", "passages.arrow", "vectors.npy"
FORMAT = 1


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
    exact_vectors: bool = False
    metric: str = "inner_product"
    corpus: str | None = None
    passage_words: int | None = None
    encoder_source: str | None = None  # what the tower was loaded from (hub name or folder), for `index add`
    build_id: str = ""
    format: int = FORMAT

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise LatentRagError(
                f"{directory} is not a latentrag index (no {MANIFEST}; an interrupted build leaves none): "
                "build one with `latentrag index build`"
            )
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (json.JSONDecodeError, TypeError) as e:
            raise LatentRagError(f"{path}: unreadable manifest ({e})") from e

    def write(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / MANIFEST, json.dumps(asdict(self), indent=2))
