"""The searcher: query vectors in, top-k ids, scores and stored vectors d(z) out, over one index folder (§2.2).

Free of the query tower, as Hugging Face's `Index.get_top_docs` and DPR's `DenseIndexer`: anything that
turns questions into vectors can search it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage, PassageStore
from latentrag.retrieval.index.faiss_io import apply_search_params, limit_threads, read_faiss
from latentrag.retrieval.index.flat_search import flat_matrix, gemm_topk
from latentrag.retrieval.index.manifest import EXACT, MANIFEST, PASSAGES, VECTORS, Manifest


class DenseIndex:
    """Top-k inner-product search over passages, with their stored vectors and texts (a `Searcher`).

    Pickling (and `copy.deepcopy`) keeps the folder, how it was opened and the search parameters, and
    re-opens the folder on the other side (faiss objects do not pickle): a Ray actor or a spawned DDP
    worker on a machine that sees the same path gets the same index; a folder rebuilt in between is refused.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        index: faiss.Index,
        store: PassageStore,
        vectors: np.ndarray | None = None,
    ):
        self.directory, self.manifest, self.faiss, self.store = directory, manifest, index, store
        self.vectors = vectors  # exact (N, d) float32, memory-mapped; None when faiss reconstructs exactly
        self.search_params = {k: v for k, v in manifest.params.items() if k in ("efSearch", "nprobe", "refine")}
        self._matrix = flat_matrix(index) if manifest.index_type == "flat" else None
        self.mmap = True  # how `load` opened the folder (kept for pickling)

    def __getstate__(self) -> dict:
        return {"directory": str(self.directory), "mmap": self.mmap, "search_params": dict(self.search_params),
                "manifest": asdict(self.manifest)}

    def __setstate__(self, state: dict) -> None:
        loaded = DenseIndex.load(state["directory"], mmap=state["mmap"])
        if asdict(loaded.manifest) != state["manifest"]:
            raise LatentRagError(
                f"{state['directory']}: the index folder changed since this index was pickled "
                f"(now {loaded.manifest.count} passages, build {loaded.manifest.build_id!r}); load it again"
            )
        loaded.search_params = dict(state["search_params"])
        apply_search_params(loaded.faiss, loaded.search_params)
        self.__dict__.update(loaded.__dict__)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.faiss.ntotal

    @classmethod
    def load(
        cls,
        directory: str | Path,
        mmap: bool = True,
        ef_search: int | None = None,
        nprobe: int | None = None,
        refine: int | None = None,
    ) -> DenseIndex:
        """Open an index folder. Flat (and HNSW) vectors stay memory-mapped; search parameters override the
        manifest's: `ef_search` (HNSW), `nprobe` (IVF), `refine` (candidates per result re-ranked exactly)."""
        directory = Path(directory).expanduser()
        manifest = Manifest.read(directory)
        limit_threads()
        index = read_faiss(directory / VECTORS, mmap and manifest.index_type in ("flat", "hnsw"))
        store = PassageStore(directory / PASSAGES)
        vectors = None
        if manifest.exact_vectors:
            try:
                vectors = np.load(directory / EXACT, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise LatentRagError(f"{directory / EXACT}: unreadable exact vectors ({e}); rebuild the index") from e
        if (
            index.ntotal != len(store)
            or index.ntotal != manifest.count
            or index.d != manifest.dim
            or (vectors is not None and vectors.shape != (manifest.count, manifest.dim))
        ):
            raise LatentRagError(
                f"{directory}: index holds {index.ntotal} vectors of dim {index.d} and {len(store)} passages but the "
                f"manifest says {manifest.count} of dim {manifest.dim}; rebuild it"
            )
        loaded = cls(directory, manifest, index, store, vectors)
        loaded.mmap = mmap
        loaded.set_search_params(ef_search=ef_search, nprobe=nprobe, refine=refine)
        return loaded

    def set_search_params(
        self, ef_search: int | None = None, nprobe: int | None = None, refine: int | None = None
    ) -> None:
        """Change the speed/recall trade-off (not while other threads search this index)."""
        kind = self.manifest.index_type
        for name, value, applies in (
            ("efSearch", ef_search, kind.startswith("hnsw")),
            ("nprobe", nprobe, kind.startswith("ivf")),
            ("refine", refine, self.vectors is not None),
        ):
            if value is None:
                continue
            if not applies:
                raise LatentRagError(f"{name} does not apply to a {kind} index")
            if int(value) < 1:
                raise LatentRagError(f"{name} must be at least 1, got {value}")
            self.search_params[name] = int(value)
        apply_search_params(self.faiss, self.search_params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B,d) float32 -> scores (B,k), row ids (B,k), best first.

        Compressed types fetch k·refine candidates and re-rank them by the exact inner product with the
        stored float32 vectors, so the returned scores are d(z)ᵀq(x) exactly.
        """
        if not 1 <= k <= len(self):
            raise LatentRagError(f"k must be between 1 and the index size {len(self)}, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise LatentRagError(f"query vectors have shape {queries.shape}, the index expects (*, {self.dim})")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._matrix is not None:
            return gemm_topk(self._matrix, queries, k)
        refine = self.search_params.get("refine", 1)
        if self.vectors is None or refine <= 1:
            return self.faiss.search(queries, k)
        _, candidates = self.faiss.search(queries, min(len(self), k * refine))
        return self._rerank(queries, candidates, k)

    def search_with_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """queries (B,d) -> scores (B,k), ids (B,k), stored vectors d(z) (B,k,d) in one call (the `Searcher`
        protocol, as Hugging Face's `Index.get_top_docs`). Rows with id −1 (fewer than k found) get zeros."""
        scores, ids = self.search(queries, k)
        valid = ids >= 0
        vectors = self.reconstruct(np.where(valid, ids, 0))
        if not valid.all():
            vectors[~valid] = 0.0
        return scores, ids, vectors

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = candidates >= 0
        vectors = self._exact(np.where(valid, candidates, 0))  # (B,K,d)
        scores = np.matmul(vectors, queries[:, :, None])[..., 0]  # (B,K)
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.take_along_axis(candidates, order, axis=1)
        top_ids[~np.isfinite(top_scores)] = -1
        return top_scores.astype(np.float32), top_ids

    def _exact(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the memory-mapped exact vectors, read in file order (one pass over the touched pages)."""
        flat = ids.reshape(-1).astype(np.int64)
        unique, inverse = np.unique(flat, return_inverse=True)
        return np.asarray(self.vectors[unique])[inverse].reshape(*ids.shape, self.dim)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored document vectors d(z) for ids (B,k) -> (B,k,d), float32, exact for every index type."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise LatentRagError(f"passage ids out of range for an index of {len(self)}")
        if self.vectors is not None:
            return self._exact(ids)
        flat = self.faiss.reconstruct_batch(ids.reshape(-1).astype(np.int64))
        return flat.reshape(*ids.shape, self.dim)

    def passages(self, ids: np.ndarray) -> list[list[Passage]]:
        return [self.store.get(row) for row in np.asarray(ids).tolist()]

    def info(self) -> dict:
        return index_info(self.directory)


def index_info(directory: str | Path) -> dict:
    """The manifest plus what is on disk (counts, file sizes), for an index that has been checked first.

    The folder is opened as a search would open it: the faiss file must read (a truncated or corrupt one
    does not), and the vectors, passages, exact vectors and manifest must agree in count and dimension;
    otherwise a `LatentRagError` says what is wrong. A healthy index is never reported for a broken one.
    """
    directory = Path(directory).expanduser()
    index = DenseIndex.load(directory)
    manifest = index.manifest
    files = {name: (directory / name).stat().st_size for name in (VECTORS, EXACT, PASSAGES, MANIFEST)
             if (directory / name).exists()}
    floor = manifest.count * manifest.dim * 4 if manifest.index_type == "flat" else 0  # raw float32 codes
    if files.get(VECTORS, 0) < floor:
        raise LatentRagError(
            f"{directory / VECTORS}: {files.get(VECTORS, 0)} bytes, too small for {manifest.count} flat vectors of "
            f"dim {manifest.dim} ({floor} bytes); rebuild the index"
        )
    return {
        "directory": str(directory),
        **asdict(manifest),
        "passages": len(index.store),
        "files": files,
        "total_bytes": sum(files.values()),
    }
