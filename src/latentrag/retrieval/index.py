"""The dense index: document vectors d(z) in faiss for maximum inner product search (paper §2.2).

An index folder holds:

    vectors.faiss     the faiss index (inner-product metric); flat and HNSW load memory-mapped
    vectors.npy       exact float32 vectors, only for types faiss cannot reconstruct exactly (SQ8, PQ);
                      memory-mapped, used to re-rank candidates and as d(z), so scores stay exact
    passages.arrow    the passage store (row i = faiss id i), memory-mapped
    manifest.json     document encoder identity (name, weights sha256), dimension, count, index type,
                      factory string and parameters, latentrag version

Durability: a build encodes the passages in chunks (4096 by default); each chunk's vectors are saved
atomically as their own file in a work folder next to the index (`.<name>.build/`), with the corpus and
settings fingerprint. The finished files are assembled in that work folder, manifest last, and the
folder then replaces the index folder in one rename. A build killed at any moment therefore leaves
either the previous index or nothing loadable, and `resume=True` re-encodes only the missing chunks,
giving the same vectors as an uninterrupted build. See docs/index.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from latentrag.atomic import atomic_path, atomic_write_text, fsync_dir, replace_dir
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage, PassageStore, passage_digest, write_passage_store
from latentrag.retrieval.encoders import DenseEncoder
from latentrag.retrieval.index_plan import INDEX_TYPES, default_params, factory_string
from latentrag.retrieval.index_plan import index_type as _index_type
from latentrag.threads import available_cores

MANIFEST, VECTORS, PASSAGES, EXACT = "manifest.json", "vectors.faiss", "passages.arrow", "vectors.npy"
STATE = "state.json"
CHUNK_SIZE = 4096
FORMAT = 1

__all__ = [
    "INDEX_TYPES",
    "DenseIndex",
    "Manifest",
    "add_to_index",
    "build_index",
    "build_index_from_vectors",
    "index_info",
]


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


def _limit_threads() -> None:
    """faiss and torch never use more threads than the cores this process owns (oversubscription costs 3x)."""
    cores = available_cores()
    if faiss.omp_get_max_threads() > cores:
        faiss.omp_set_num_threads(cores)
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


def _read_faiss(path: Path, mmap: bool) -> faiss.Index:
    """Read an index; with mmap the flat codes stay in the file's pages (shared between processes)."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        if mmap:  # a type faiss cannot map in place: read it into memory instead
            try:
                return faiss.read_index(str(path), 0)
            except RuntimeError:
                pass
        raise LatentRagError(f"{path}: not a readable faiss index ({str(e).splitlines()[0]}); rebuild it") from e


def _set_search_params(index: faiss.Index, params: dict) -> None:
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


SCORE_BLOCK = 1 << 23  # scores (float32, 32 MB) per matrix product: reduced while they are still in cache
MAXIMA_BLOCK = 1 << 22  # group maxima (16 MB) kept before choosing candidate groups among them
QUERY_BLOCK = 256  # queries per matrix product, so a passage block still spans >= 32,768 passages
RESCORE_AT = 4096  # candidates per query gathered before faiss re-scores them down to k
TOPK_GROUP = 16  # scores per group in the grouped top-k


def _flat_matrix(index: faiss.Index) -> torch.Tensor | None:
    """The (N, d) float32 vectors of a flat index as a tensor over faiss's own (memory-mapped) buffer, no copy."""
    flat = faiss.downcast_index(index)
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
        return None
    array = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only mapping: we never write through it
        return torch.from_numpy(array)


def _topk_grouped(scores: torch.Tensor, k: int, group: int = TOPK_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of (B, n) scores, best first, selecting among group maxima first.

    The top-k entries of a row lie in at most k groups of `group` columns, and each of those groups has a
    maximum at least the k-th best score, so they are among the k groups with the largest maxima: one
    cheap max-reduction and a top-k over n/group maxima replace a top-k over all n scores. A group is a
    strided set of columns (j, j + G, j + 2G, ... for G = n/group), so the maxima are an element-wise
    max of `group` contiguous slices: vectorised, unlike a reduction over 16 adjacent floats (~6x slower).
    """
    b, n = scores.shape
    g = n // group
    if g <= k:
        return scores.topk(min(k, n), dim=1)
    m = g * group
    head = scores if m == n else scores[:, :m]
    # (B, G): maximum of columns j, j + G, ..., j + (group-1)·G; numpy on this thread (see `_gemm_topk`)
    maxima = torch.from_numpy(np.max(head.numpy().reshape(b, group, g), axis=1))
    _, groups = maxima.topk(k, dim=1)
    cols = (groups[:, :, None] + torch.arange(0, m, g)).reshape(b, k * group)
    values, order = scores.gather(1, cols).topk(k, dim=1)
    ids = cols.gather(1, order)
    if m < n:
        tail_values, tail_ids = scores[:, m:].topk(min(k, n - m), dim=1)
        values, order = torch.cat([values, tail_values], 1).topk(k, dim=1)
        ids = torch.cat([ids, tail_ids + m], 1).gather(1, order)
    return values, ids


def _rescore(queries: np.ndarray, matrix: np.ndarray, ids: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query's inner products with its candidate rows `ids` (B, c), by faiss's own kernel (the one
    its flat search uses, so the scores are faiss's to the bit), best first."""
    ids = np.ascontiguousarray(ids.numpy(), dtype=np.int64)
    b, c = ids.shape
    k = min(k, c)
    scores, found = np.empty((b, k), np.float32), np.empty((b, k), np.int64)
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(queries), faiss.swig_ptr(matrix), faiss.swig_ptr(ids), matrix.shape[1], b, len(matrix), c, k,
        faiss.swig_ptr(scores), faiss.swig_ptr(found), c,
    )
    return scores, found


@torch.inference_mode()
def _gemm_topk(matrix: torch.Tensor, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products as blocked matrix products + grouped top-k selection.

    faiss 1.15's flat search scores queries one by one unless there are 128,000 of them
    (`distance_compute_blas_threshold`), a memory-bound scan (~4 GFLOP/s here). Here each block of up to
    256 queries × SCORE_BLOCK/256 passages is one BLAS product written into a reused 32 MB buffer and
    reduced, while still in cache, to the maxima of groups of 16 scores (strided columns j, j + G, ...).
    That reduction runs in numpy on the calling thread, as fast as torch's on two (it is memory-bound):
    on a shared machine a short parallel region often waits for a worker thread that cannot get a core
    (torch's amax of one block took 16 ms instead of 1 under load). The top-k passages lie in the k
    groups with the largest maxima (see `_topk_grouped`), so once per MAXIMA_BLOCK of maxima those k·16
    passages become candidates (a last, narrower block gives its `_topk_grouped` ids). faiss's own
    inner-product kernel re-scores the candidates, once per query block unless they pass RESCORE_AT:
    the same ids as faiss's flat search and, bit for bit, the same scores.
    """
    x = matrix.numpy()
    q = torch.from_numpy(queries)
    b, n = q.shape[0], matrix.shape[0]
    qb = min(b, QUERY_BLOCK)
    block = min(n, max(SCORE_BLOCK // qb, 4 * k * TOPK_GROUP) // TOPK_GROUP * TOPK_GROUP)
    groups = block // TOPK_GROUP
    # rows in regular blocks: a whole number of groups, more than k of them (a block spans >= 64·k passages,
    # so only an index smaller than one block can have k groups or fewer: it takes the last-block path)
    full = n // block * block if block % TOPK_GROUP == 0 and groups > k else 0
    per_flush = max(1, MAXIMA_BLOCK // (qb * max(groups, 1)))  # blocks whose maxima are reduced together
    score_buffer = torch.empty(qb * block)
    maxima_buffer = torch.empty(qb * per_flush * groups) if full else None
    offsets = torch.arange(0, block, groups) if full else None  # the columns of group j are j + offsets
    best_scores, best_ids = np.empty((b, k), np.float32), np.empty((b, k), np.int64)
    for qs in range(0, b, qb):
        part, part_np = q[qs : qs + qb], queries[qs : qs + qb]
        p = len(part)
        candidates: list[torch.Tensor] = []  # (p, c) passage ids

        def add(ids: torch.Tensor, part_np=part_np, candidates=candidates) -> None:
            candidates.append(ids)
            if sum(c.shape[1] for c in candidates) >= RESCORE_AT:
                candidates[:] = [torch.from_numpy(_rescore(part_np, x, torch.cat(candidates, 1), k)[1])]

        if full:
            scores = score_buffer[: p * block].view(p, block)
            maxima = maxima_buffer[: p * per_flush * groups].view(p, per_flush * groups)
            filled, first = 0, 0
            strided, maxima_np = scores.numpy().reshape(p, TOPK_GROUP, groups), maxima.numpy()
            for start in range(0, full, block):
                torch.mm(part, matrix[start : start + block].T, out=scores)
                # numpy, on this thread: as fast as torch's two threads (memory-bound), and no thread to wake
                np.max(strided, axis=1, out=maxima_np[:, filled * groups : (filled + 1) * groups])
                filled += 1
                if filled == per_flush or start + block == full:
                    _, top = maxima[:, : filled * groups].topk(k, dim=1)  # (p, k) groups of these blocks
                    cols = first + top // groups * block + top % groups
                    add((cols[:, :, None] + offsets).reshape(p, k * TOPK_GROUP))
                    filled, first = 0, start + block
        if full < n:  # the last block, narrower than the others (or the only one)
            rows = matrix[full:]
            scores = score_buffer[: p * len(rows)].view(p, len(rows))
            torch.mm(part, rows.T, out=scores)
            add(_topk_grouped(scores, k)[1] + full)
        best_scores[qs : qs + p], best_ids[qs : qs + p] = _rescore(part_np, x, torch.cat(candidates, 1), k)
    return best_scores, best_ids


class DenseIndex:
    """Top-k inner-product search over passages, with their stored vectors and texts."""

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
        self._matrix = _flat_matrix(index) if manifest.index_type == "flat" else None

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
        _limit_threads()
        index = _read_faiss(directory / VECTORS, mmap and manifest.index_type in ("flat", "hnsw"))
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
        _set_search_params(self.faiss, self.search_params)

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
            return _gemm_topk(self._matrix, queries, k)
        refine = self.search_params.get("refine", 1)
        if self.vectors is None or refine <= 1:
            return self.faiss.search(queries, k)
        _, candidates = self.faiss.search(queries, min(len(self), k * refine))
        return self._rerank(queries, candidates, k)

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
    """The manifest plus what is on disk: counts and file sizes."""
    directory = Path(directory).expanduser()
    manifest = Manifest.read(directory)
    files = {name: (directory / name).stat().st_size for name in (VECTORS, EXACT, PASSAGES, MANIFEST)
             if (directory / name).exists()}
    store = PassageStore(directory / PASSAGES)
    return {
        "directory": str(directory),
        **asdict(manifest),
        "passages": len(store),
        "files": files,
        "total_bytes": sum(files.values()),
    }


# ---- building -----------------------------------------------------------------------------------------
def _work_dir(directory: Path, kind: str) -> Path:
    return directory.parent / f".{directory.name}.{kind}"


def _prepare_build(directory, index_type: str, exact_vectors: bool | None):
    """Shared set-up of every build: the index type, whether exact vectors are kept, a safe target, threads,
    and the work folder beside the target."""
    kind = _index_type(index_type)
    exact = (not kind.exact_reconstruct) if exact_vectors is None else bool(exact_vectors)
    directory = Path(directory).expanduser()
    _check_target(directory)
    _limit_threads()
    return kind, exact, directory, _work_dir(directory, "build")


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise LatentRagError(f"{directory} is a file: give a folder for the index")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise LatentRagError(
            f"{directory} is a non-empty folder that is not a latentrag index: refusing to replace it; "
            "give a new or empty folder"
        )




def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _load_state(work: Path) -> dict | None:
    path = work / STATE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _stream_passages(
    passages: Iterable[Passage], store_path: Path | None, existing: set[str] | None = None, where: str = ""
) -> tuple[int, str]:
    """Count and fingerprint passages, refusing duplicate ids; writes the store when `store_path` is given."""
    digest = hashlib.sha256()
    seen: set[str] = set()

    def checked() -> Iterator[Passage]:
        for p in passages:
            if p.id in seen:
                raise LatentRagError(f"duplicate passage id '{p.id}' in the corpus: ids must be unique")
            if existing is not None and p.id in existing:
                raise LatentRagError(
                    f"duplicate passage id '{p.id}': the index {where} already holds it; give new documents new ids"
                )
            seen.add(p.id)
            passage_digest(digest, p)
            yield p

    count = sum(1 for _ in checked()) if store_path is None else write_passage_store(store_path, checked())
    return count, digest.hexdigest()


def _chunk_path(work: Path, c: int) -> Path:
    return work / f"chunk-{c:06d}.npy"


def _chunk_ok(path: Path, rows: int, dim: int) -> bool:
    if not path.exists():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


@torch.inference_mode()
def encode_passages(
    encoder: DenseEncoder, titles: list[str], texts: list[str], batch_size: int = 64, bar: tqdm | None = None
) -> np.ndarray:
    """(title, text) pairs -> (N, d) float32 with the document tower, in length-sorted batches.

    The whole list is tokenized once (the fast tokenizer batches it in Rust), sorted by token count so a
    batch pads to similar lengths, and padded per batch: no text is tokenized twice.
    """
    n = len(texts)
    out = np.empty((n, encoder.dim), dtype=np.float32)
    if n == 0:
        return out
    tokenized = encoder.tokenizer(titles, texts, truncation=True, max_length=encoder.max_length)
    keys = list(tokenized.keys())
    lengths = np.fromiter((len(ids) for ids in tokenized["input_ids"]), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    was_training = encoder.training
    encoder.eval()
    device = encoder.device
    try:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            features = [{key: tokenized[key][i] for key in keys} for i in rows]
            batch = encoder.tokenizer.pad(features, padding=True, return_tensors="pt")
            vectors = encoder(**{key: value.to(device) for key, value in batch.items()})
            out[rows] = vectors.float().cpu().numpy()
            if bar is not None:
                bar.update(len(rows))
    finally:
        encoder.train(was_training)
    return out


def _encode_chunks(
    store: PassageStore, encoder: DenseEncoder, work: Path, chunk_size: int, batch_size: int, progress: bool
) -> list[Path]:
    """Encode every chunk not already saved in `work`; each chunk's vectors are written atomically."""
    n, dim = len(store), encoder.dim
    bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    paths = [_chunk_path(work, c) for c in range(len(bounds))]
    done = [_chunk_ok(p, b - a, dim) for p, (a, b) in zip(paths, bounds, strict=True)]
    initial = sum(b - a for (a, b), ok in zip(bounds, done, strict=True) if ok)
    with tqdm(total=n, initial=initial, desc="encoding", unit="passage", disable=not progress) as bar:
        for path, (a, b), ok in zip(paths, bounds, done, strict=True):
            if ok:
                continue
            titles, texts = store.slice(a, b)
            _save_npy(path, encode_passages(encoder, titles, texts, batch_size, bar))
    return paths


def _training_sample(chunks: list[np.ndarray], n: int, size: int, seed: int = 0) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))
    starts = np.cumsum([0] + [len(c) for c in chunks])
    parts = []
    for c, chunk in enumerate(chunks):
        local = rows[(rows >= starts[c]) & (rows < starts[c + 1])] - starts[c]
        if len(local):
            parts.append(np.asarray(chunk[local]))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _assemble(
    work: Path,
    chunk_paths: list[Path],
    manifest: Manifest,
    progress: bool,
    base: tuple[faiss.Index, PassageStore, np.ndarray | None] | None = None,
) -> Path:
    """Write the finished index into `work/out` (manifest last) and return that folder."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    chunks = [np.load(p, mmap_mode="r") for p in chunk_paths]
    new_rows = sum(len(c) for c in chunks)
    dim, params = manifest.dim, manifest.params
    if base is None:
        index = faiss.index_factory(dim, manifest.factory, faiss.METRIC_INNER_PRODUCT)
        if "efConstruction" in params:
            faiss.downcast_index(index).hnsw.efConstruction = int(params["efConstruction"])
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf = faiss.downcast_index(ivf)
            if hasattr(ivf, "do_polysemous_training"):
                ivf.do_polysemous_training = False  # Hamming pre-filtering we never use; it costs minutes
        if not index.is_trained:
            sample = _training_sample(chunks, new_rows, int(params.get("train_size", new_rows)))
            index.train(sample)
            del sample
        if manifest.index_type.startswith("ivf") and not manifest.exact_vectors:
            faiss.extract_index_ivf(index).make_direct_map()
    else:
        index = base[0]
    for chunk in tqdm(chunks, desc="indexing", unit="chunk", disable=not progress):
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    _set_search_params(index, params)
    with atomic_path(out / VECTORS) as tmp:
        faiss.write_index(index, str(tmp))
    if manifest.exact_vectors:
        with atomic_path(out / EXACT) as tmp:
            prefix = base[2] if base is not None else None
            total = (len(prefix) if prefix is not None else 0) + new_rows
            dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
            row = 0
            for part in ([prefix] if prefix is not None else []) + chunks:
                for s in range(0, len(part), 65536):
                    block = part[s : s + 65536]
                    dest[row : row + len(block)] = block
                    row += len(block)
            dest.flush()
            del dest
    if base is None:
        try:
            os.link(work / PASSAGES, out / PASSAGES)  # same bytes, no copy
        except OSError:
            with atomic_path(out / PASSAGES) as tmp:
                shutil.copyfile(work / PASSAGES, tmp)
    else:
        write_passage_store(out / PASSAGES, PassageStore(work / PASSAGES), prefix=base[1])
    manifest.write(out)
    fsync_dir(out)
    return out


def _finish(work: Path, directory: Path, build_id: str) -> bool:
    """If a previous run got as far as assembling (or swapping), complete it; True when the index is in place."""
    out = work / "out"
    if (out / MANIFEST).exists():
        if Manifest.read(out).build_id == build_id:
            replace_dir(out, directory)
            shutil.rmtree(work, ignore_errors=True)
            return True
        shutil.rmtree(out, ignore_errors=True)  # the previous index, swapped out before the kill
    if (directory / MANIFEST).exists() and Manifest.read(directory).build_id == build_id:
        shutil.rmtree(work, ignore_errors=True)
        return True
    return False


def build_index(
    passages: Iterable[Passage],
    encoder: DenseEncoder,
    directory: str | Path,
    index_type: str = "flat",
    batch_size: int = 64,
    progress: bool = True,
    *,
    resume: bool = False,
    chunk_size: int = CHUNK_SIZE,
    exact_vectors: bool | None = None,
    corpus: str | None = None,
    passage_words: int | None = None,
    encoder_source: str | None = None,
) -> DenseIndex:
    """Encode passages with the (frozen) document tower and write a complete index folder.

    exact_vectors: keep exact float32 vectors in `vectors.npy` (default: only for the types whose faiss
    reconstruction is approximate: hnsw-sq8, ivf-sq8, ivf-pq). resume: continue the interrupted build of
    the same corpus and settings from its last completed chunk.
    """
    from latentrag import __version__

    if chunk_size < 1 or batch_size < 1:
        raise LatentRagError(f"chunk and batch sizes must be positive (got {chunk_size}, {batch_size})")
    kind, exact, directory, work = _prepare_build(directory, index_type, exact_vectors)
    identity = encoder.identity()
    settings = {
        "encoder": identity,
        "index_type": index_type,
        "exact_vectors": exact,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "format": FORMAT,
    }
    state = _load_state(work) if resume else None
    if state is not None and state.get("settings") != settings:
        raise LatentRagError(
            f"cannot resume: the interrupted build in {work} used other settings ({state.get('settings')}); "
            "build without --resume to start over"
        )
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            count, digest = _stream_passages(passages, work / PASSAGES)
            if count == 0:
                raise LatentRagError("the corpus holds no passages: nothing to index")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing half-written remains
            raise
        state = {"settings": settings, "corpus_sha256": digest, "count": count, "build_id": uuid.uuid4().hex}
        atomic_write_text(work / STATE, json.dumps(state, indent=2))
    else:
        count, digest = _stream_passages(passages, None)
        if digest != state["corpus_sha256"] or count != state["count"]:
            raise LatentRagError(
                f"cannot resume: the corpus differs from the one the interrupted build in {work} started with "
                f"({count} passages now, {state['count']} then); build without --resume to start over"
            )
        if _finish(work, directory, state["build_id"]):
            return DenseIndex.load(directory)
    store = PassageStore(work / PASSAGES)
    chunk_paths = _encode_chunks(store, encoder, work, chunk_size, batch_size, progress)
    params = default_params(index_type, count, encoder.dim)
    manifest = Manifest(
        encoder=identity,
        dim=encoder.dim,
        count=count,
        index_type=index_type,
        factory=factory_string(index_type, params),
        version=__version__,
        params=params,
        exact_vectors=exact,
        corpus=corpus,
        passage_words=passage_words,
        encoder_source=encoder_source,
        build_id=state["build_id"],
    )
    del store
    _assemble(work, chunk_paths, manifest, progress)
    _finish(work, directory, state["build_id"])
    return DenseIndex.load(directory)


def build_index_from_vectors(
    vectors: np.ndarray,
    passages: Iterable[Passage],
    directory: str | Path,
    encoder_identity: dict,
    index_type: str = "flat",
    *,
    exact_vectors: bool | None = None,
    progress: bool = False,
    chunk_size: int = 65536,
) -> DenseIndex:
    """An index folder from vectors already computed by a document tower (e.g. released DPR embeddings).

    `encoder_identity` is that tower's `DenseEncoder.identity()` (at least `name`, `sha256`); row i of
    `vectors` (N, d) encodes passage i. Written with the same atomic steps as `build_index`.
    """
    from latentrag import __version__

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise LatentRagError(f"vectors must be (N, d), got shape {vectors.shape}")
    kind, exact, directory, work = _prepare_build(directory, index_type, exact_vectors)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        count, _ = _stream_passages(passages, work / PASSAGES)
        if count != len(vectors) or count == 0:
            raise LatentRagError(f"{len(vectors)} vectors for {count} passages: give one vector per passage")
        paths = []
        for c, start in enumerate(range(0, count, chunk_size)):
            paths.append(_chunk_path(work, c))
            _save_npy(paths[-1], vectors[start : start + chunk_size])
        n, dim = vectors.shape
        params = default_params(index_type, n, dim)
        build_id = uuid.uuid4().hex
        manifest = Manifest(
            encoder=dict(encoder_identity), dim=dim, count=n, index_type=index_type,
            factory=factory_string(index_type, params), version=__version__, params=params, exact_vectors=exact,
            build_id=build_id,
        )
        _assemble(work, paths, manifest, progress)
        _finish(work, directory, build_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DenseIndex.load(directory)


def add_to_index(
    directory: str | Path,
    passages: Iterable[Passage],
    encoder: DenseEncoder,
    batch_size: int = 64,
    progress: bool = True,
    chunk_size: int = CHUNK_SIZE,
) -> DenseIndex:
    """Append passages to an index (same document encoder); an id already in the index is an error.

    The grown index is assembled next to the old one and replaces it in one rename, so a reader sees
    either the old index or the new one. IVF cells and quantisers keep their original training.
    """
    from latentrag import __version__

    directory = Path(directory).expanduser()
    manifest = Manifest.read(directory)
    identity = encoder.identity()
    if identity.get("sha256") != manifest.encoder.get("sha256") or encoder.dim != manifest.dim:
        raise LatentRagError(
            f"{directory} was built by document encoder '{manifest.encoder.get('name')}' "
            f"(sha256 {str(manifest.encoder.get('sha256'))[:12]}…, dim {manifest.dim}); '{identity.get('name')}' "
            f"(sha256 {identity['sha256'][:12]}…, dim {encoder.dim}) encodes into another space: use the same encoder"
        )
    _limit_threads()
    base_store = PassageStore(directory / PASSAGES)
    base_index = _read_faiss(directory / VECTORS, mmap=False)
    base_vectors = np.load(directory / EXACT, mmap_mode="r") if manifest.exact_vectors else None
    work = _work_dir(directory, "add")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        count, _ = _stream_passages(passages, work / PASSAGES, set(base_store.ids()), str(directory))
        if count == 0:
            raise LatentRagError("the corpus holds no passages: nothing to add")
        store = PassageStore(work / PASSAGES)
        chunk_paths = _encode_chunks(store, encoder, work, chunk_size, batch_size, progress)
        build_id = uuid.uuid4().hex
        grown = Manifest(
            **{**asdict(manifest), "count": manifest.count + count, "version": __version__, "build_id": build_id,
               "created": time.time()}
        )
        _assemble(work, chunk_paths, grown, progress, base=(base_index, base_store, base_vectors))
        del store, base_store, base_vectors
        _finish(work, directory, build_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DenseIndex.load(directory)


def chunk_count(n: int, chunk_size: int = CHUNK_SIZE) -> int:
    return math.ceil(n / chunk_size)
