"""Importing published document vectors into an index without re-encoding (the paper's 21M-passage Wikipedia).

Encoding 21M passages again costs weeks of CPU; their DPR vectors are published in two forms:

* DPR's own release: `wikipedia_passages_*.pkl` shards, each a pickle of a list of (id, float32 vector)
  tuples, and `psgs_w100.tsv` (columns id, text, title). The shards are read one at a time with a
  restricted unpickler (`load_dpr_shard`) that admits only numpy arrays and Python containers/scalars:
  a pickle that asks for anything else is refused before anything in it runs.
* Hugging Face `datasets`' copy (`wiki_dpr`): a `save_to_disk` folder (Arrow stream files listed in its
  `state.json`) or bare Arrow files with columns title, text, embeddings (and optionally id), the layout
  Hugging Face's `CustomHFIndex` reads. Read memory-mapped with pyarrow, batch by batch.

Both go through the same chunk/assemble path as `build_index` (`build._assemble`): vectors are written
into chunk files of `chunk_size` rows in a work folder beside the index, so memory holds one DPR shard
(or one Arrow batch) and one chunk at a time, not the corpus. An import killed at any point resumes with
`resume=True`: DPR shards already placed (their row file saved) are skipped. The manifest records the
document encoder the vectors came from, so a query tower paired with another document tower is refused.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib
import json
import pickle
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from latentrag.atomic import atomic_path, atomic_write_text
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage, passage_digest, read_table, write_passage_store
from latentrag.retrieval.index.build import (
    _assemble,
    _chunk_ok,
    _chunk_path,
    _finish,
    _load_state,
    _make_work_dir,
    _prepare_build,
    _save_npy,
    _work_dir,
)
from latentrag.retrieval.index.dense_index import DenseIndex
from latentrag.retrieval.index.manifest import FORMAT, PASSAGES, Manifest
from latentrag.retrieval.index_plan import default_params, factory_string

IMPORT_CHUNK_SIZE = 65536
DPR_ID_PREFIX = "wiki:"  # DPR's later releases name passages "wiki:<tsv id>"
_SHOWN = 5  # ids named in a mismatch error

# ---- DPR's pickled shards -------------------------------------------------------------------------------
# What a pickle of (id, numpy vector) tuples needs: numpy's array/dtype/scalar reconstructors (numpy 1.x
# pickles name `numpy.core.*`, numpy 2 `numpy._core.*`) and `_codecs.encode` (protocol-2 pickles store
# array bytes as latin-1 text). None of them runs code chosen by the pickle.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _VectorUnpickler(pickle.Unpickler):
    """Admits numpy arrays, tuples, lists, strings and numbers; refuses every other global (nothing runs)."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core") else module
        if (canonical, name) not in _ALLOWED:
            raise LatentRagError(
                f"{self.where}: the pickle asks for {module}.{name}; refused (a DPR embeddings shard holds only "
                "(id, numpy vector) tuples, so it was not unpickled): check where this file came from"
            )
        return getattr(importlib.import_module(canonical), name)

    def persistent_load(self, pid):
        raise LatentRagError(f"{self.where}: the pickle asks for a persistent object; refused")


def load_dpr_shard(path: str | Path) -> tuple[list[str], np.ndarray]:
    """One `wikipedia_passages_*.pkl` shard -> (ids, (n, d) float32), read by the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            records = _VectorUnpickler(f, str(path)).load()
    except LatentRagError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise LatentRagError(f"{path}: not a readable DPR embeddings pickle ({type(e).__name__}: {e})") from e
    if not isinstance(records, (list, tuple)) or not records:
        raise LatentRagError(f"{path}: expected a non-empty list of (id, vector) tuples, got {type(records).__name__}")
    ids: list[str] = []
    vectors = []
    for i, record in enumerate(records):
        if not (isinstance(record, (tuple, list)) and len(record) == 2):
            raise LatentRagError(f"{path}: record {i} is not an (id, vector) pair")
        pid, vec = record
        if isinstance(pid, bool) or not isinstance(pid, (str, int, np.integer)):
            raise LatentRagError(f"{path}: record {i} has id of type {type(pid).__name__}; expected a string")
        if not isinstance(vec, np.ndarray) or vec.dtype.kind not in "fiu" or vec.ndim != 1:
            raise LatentRagError(f"{path}: record {i} (id {pid!r}) holds no 1-d numeric numpy vector")
        ids.append(str(pid))
        vectors.append(vec)
    dims = {len(v) for v in vectors}
    if len(dims) != 1:
        raise LatentRagError(f"{path}: vectors of several dimensions {sorted(dims)}")
    return ids, np.stack(vectors).astype(np.float32, copy=False)


def shard_paths(pattern: str | Path | Iterable[str | Path]) -> list[Path]:
    """The shards a glob names, in natural order (`_2` before `_10`), as DPR numbers them."""
    if isinstance(pattern, (str, Path)):
        paths = [Path(p) for p in globlib.glob(str(Path(pattern).expanduser()))]
        if not paths and Path(pattern).is_file():
            paths = [Path(pattern)]
    else:
        paths = [Path(p) for p in pattern]
    if not paths:
        raise LatentRagError(f"no DPR embeddings shards match '{pattern}': give a glob such as 'wikipedia_passages_*.pkl'")
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


# ---- ids --------------------------------------------------------------------------------------------------
class _IdTable:
    """Passage ids (as utf-8 bytes, sorted) -> store row: searchsorted lookups, ~id-length bytes per passage."""

    def __init__(self, sorted_ids: np.ndarray, rows: np.ndarray):
        self.sorted_ids, self.rows = sorted_ids, rows

    @classmethod
    def from_chunks(cls, chunks: list[np.ndarray]) -> _IdTable:
        width = max((c.dtype.itemsize for c in chunks), default=1)
        ids = np.concatenate([c.astype(f"S{width}") for c in chunks]) if chunks else np.empty(0, "S1")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(dup):
            shown = ", ".join(repr(sorted_ids[i].decode()) for i in dup[:_SHOWN])
            raise LatentRagError(f"duplicate passage ids in the passages file: {shown} ({len(dup)} in all): ids must be unique")
        return cls(sorted_ids, order)

    def save(self, work: Path) -> None:
        _save_npy_any(work / "ids.npy", self.sorted_ids)
        _save_npy_any(work / "id_rows.npy", self.rows)

    @classmethod
    def load(cls, work: Path) -> _IdTable:
        return cls(np.load(work / "ids.npy"), np.load(work / "id_rows.npy"))

    def lookup(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found mask) for ids; rows are -1 where not found."""
        keys = np.array([i.encode("utf-8") for i in ids], dtype=f"S{max(1, self.sorted_ids.dtype.itemsize)}")
        too_long = np.array([len(i.encode("utf-8")) > self.sorted_ids.dtype.itemsize for i in ids], dtype=bool)
        pos = np.searchsorted(self.sorted_ids, keys).clip(0, max(0, len(self.sorted_ids) - 1))
        found = (self.sorted_ids[pos] == keys) & ~too_long if len(self.sorted_ids) else np.zeros(len(ids), bool)
        return np.where(found, self.rows[pos], -1), found

    def id_of(self, rows: np.ndarray) -> list[str]:
        inverse = np.empty_like(self.rows)
        inverse[self.rows] = np.arange(len(self.rows))
        return [self.sorted_ids[inverse[r]].decode("utf-8") for r in rows]


def _save_npy_any(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _write_passages(passages: Iterable[Passage], store: Path, id_block: int = 1 << 20) -> tuple[int, str, list]:
    """Stream passages into the store; return count, fingerprint and their ids as byte-string blocks."""
    digest = hashlib.sha256()
    blocks: list[np.ndarray] = []
    pending: list[bytes] = []

    def tapped() -> Iterator[Passage]:
        for p in passages:
            passage_digest(digest, p)
            pending.append(p.id.encode("utf-8"))
            if len(pending) >= id_block:
                blocks.append(np.array(pending, dtype=bytes))
                pending.clear()
            yield p

    count = write_passage_store(store, tapped())
    if pending:
        blocks.append(np.array(pending, dtype=bytes))
    return count, digest.hexdigest(), blocks


def _named(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:_SHOWN]) + (f" … ({len(ids)} in all)" if len(ids) > _SHOWN else "")


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---- the shared frame: work folder, state, manifest ----------------------------------------------------
class _Import:
    """An import's work folder (`.<index>.import/` beside it) and its resumable state."""

    def __init__(self, directory, index_type, exact_vectors, settings: dict, resume: bool):
        self.kind, self.exact, self.directory, _ = _prepare_build(directory, index_type, exact_vectors)
        self.index_type = index_type
        self.work = _work_dir(self.directory, "import")
        self.settings = {**settings, "index_type": index_type, "exact_vectors": self.exact, "format": FORMAT}
        state = _load_state(self.work) if resume else None
        if state is not None and not self._same_inputs(state.get("settings") or {}):
            raise LatentRagError(
                f"cannot resume: the interrupted import in {self.work} used other inputs or settings; "
                "import without --resume to start over"
            )
        if state is not None:
            state["settings"] = self.settings
        if state is None:
            shutil.rmtree(self.work, ignore_errors=True)
            _make_work_dir(self.work)
        self.state = state

    def _same_inputs(self, previous: dict) -> bool:
        """Whether an interrupted import can go on with these settings: the same inputs, except that the
        encoder may be renamed (it is recorded only at the end) and a DPR shard not yet placed may have been
        replaced (a late error in one shard is fixed by giving that shard again)."""
        ignored = {"encoder", "shards"}
        if {k: v for k, v in previous.items() if k not in ignored} != \
                {k: v for k, v in self.settings.items() if k not in ignored}:
            return False
        old, new = previous.get("shards"), self.settings.get("shards")
        if old is None or new is None:
            return old == new
        if [o["path"] for o in old] != [n["path"] for n in new]:
            return False
        return all(o == n for i, (o, n) in enumerate(zip(old, new, strict=True))
                   if (self.work / f"shard-{i:05d}.rows.npy").exists())

    def check_dim(self, dim: int, encoder_identity: dict, where: str) -> None:
        """Refuse vectors whose dimension is not the named document encoder's, as soon as it is known."""
        if encoder_identity.get("dim") not in (None, dim):
            raise LatentRagError(
                f"{where}: vectors of dimension {dim}, but document encoder '{encoder_identity.get('name')}' "
                f"produces {encoder_identity.get('dim')}: name the encoder that made these vectors (the work "
                "so far is kept: run again with the right encoder and --resume)"
            )

    def save_state(self, **values) -> None:
        self.state = {"settings": self.settings, "build_id": uuid.uuid4().hex, **values}
        atomic_write_text(self.work / "state.json", json.dumps(self.state, indent=2))

    def finish(self, chunk_paths: list[Path], dim: int, count: int, encoder_identity: dict, corpus: str,
               encoder_source: str | None, progress: bool) -> DenseIndex:
        from latentrag import __version__

        self.check_dim(dim, encoder_identity, "the import")
        params = default_params(self.index_type, count, dim)
        manifest = Manifest(
            encoder={**encoder_identity, "dim": dim}, dim=dim, count=count, index_type=self.index_type,
            factory=factory_string(self.index_type, params), version=__version__, params=params,
            exact_vectors=self.exact, corpus=corpus, encoder_source=encoder_source or encoder_identity.get("name"),
            build_id=self.state["build_id"],
        )
        _assemble(self.work, chunk_paths, manifest, progress)
        _finish(self.work, self.directory, self.state["build_id"])
        return DenseIndex.load(self.directory)


def _run(job: _Import, body) -> DenseIndex:
    """Bad input found before any resumable work removes the work folder (nothing half-written stays); once
    the passages are written (the state saved), an error keeps the work for `--resume`, as a crash or kill
    does, and says so."""
    try:
        return body()
    except LatentRagError as e:
        if job.state is None:
            shutil.rmtree(job.work, ignore_errors=True)
            raise
        if "--resume" in str(e):
            raise
        raise LatentRagError(f"{e} (the work so far is kept in {job.work}: fix the cause and run the same import "
                             "again with --resume, or delete that folder)") from e


def _chunk_memmap(work: Path, c: int, rows: int, dim: int) -> np.memmap:
    path = _chunk_path(work, c)
    if not path.exists():
        with atomic_path(path) as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim)).flush()
    arr = np.lib.format.open_memmap(path, mode="r+")
    if arr.shape != (rows, dim):
        raise LatentRagError(f"{path}: a chunk of shape {arr.shape}, expected {(rows, dim)}; import without --resume")
    return arr


def import_dpr_embeddings(
    shards: str | Path | Iterable[str | Path],
    passages: str | Path,
    directory: str | Path,
    encoder_identity: dict,
    index_type: str = "flat",
    *,
    exact_vectors: bool | None = None,
    resume: bool = False,
    chunk_size: int = IMPORT_CHUNK_SIZE,
    id_prefix: str = DPR_ID_PREFIX,
    encoder_source: str | None = None,
    progress: bool = False,
) -> DenseIndex:
    """An index from DPR's released `wikipedia_passages_*.pkl` shards and `psgs_w100.tsv`, no re-encoding.

    Store row i is the TSV's row i; each shard's vectors are placed at the rows of their ids (an id
    "wiki:123" matches TSV id "123" via `id_prefix`). Memory: one shard, the sorted id table (~id length
    bytes per passage) and the faiss index being built. encoder_source: what `index add` should load as the
    document tower (default: the identity's name). Ids in the shards but not the TSV, passages with
    no vector, and ids with two vectors are each a `LatentRagError` naming a few.
    """
    if chunk_size < 1:
        raise LatentRagError(f"chunk size must be positive, got {chunk_size}")
    paths = shard_paths(shards)
    tsv = Path(passages).expanduser()
    if not tsv.is_file():
        raise LatentRagError(f"passages file {tsv} does not exist: give DPR's psgs_w100.tsv (id, text, title)")
    settings = {"source": "dpr", "shards": [_file_key(p) for p in paths], "passages": _file_key(tsv),
                "chunk_size": chunk_size, "id_prefix": id_prefix, "encoder": dict(encoder_identity)}
    job = _Import(directory, index_type, exact_vectors, settings, resume)

    def body() -> DenseIndex:
        work = job.work
        if job.state is None:
            docs = read_table(tsv, "\t")
            count, digest, blocks = _write_passages((Passage(d.id, d.title, d.text) for d in docs), work / PASSAGES)
            if count == 0:
                raise LatentRagError(f"{tsv} holds no passages: nothing to import")
            _IdTable.from_chunks(blocks).save(work)
            del blocks
            job.save_state(count=count, corpus_sha256=digest, dim=None)
        count = job.state["count"]
        table = _IdTable.load(work)
        dim = job.state.get("dim")
        bar = tqdm(total=len(paths), desc="placing shards", unit="shard", disable=not progress)
        for s, path in enumerate(paths):
            rows_file = work / f"shard-{s:05d}.rows.npy"
            if rows_file.exists():
                bar.update(1)
                continue
            ids, vectors = load_dpr_shard(path)
            if id_prefix:
                ids = [i[len(id_prefix):] if i.startswith(id_prefix) else i for i in ids]
            if dim is None:
                dim = vectors.shape[1]
                job.check_dim(dim, encoder_identity, str(path))
                job.state["dim"] = dim
                atomic_write_text(work / "state.json", json.dumps(job.state, indent=2))
            elif vectors.shape[1] != dim:
                raise LatentRagError(f"{path}: vectors of dimension {vectors.shape[1]}, earlier shards {dim}")
            rows, found = table.lookup(ids)
            if not found.all():
                missing = [i for i, ok in zip(ids, found, strict=True) if not ok]
                raise LatentRagError(
                    f"{path}: ids with vectors but no passage in {tsv}: {_named(missing)}; give the passages file "
                    "these vectors were computed from"
                )
            unique, counts = np.unique(rows, return_counts=True)
            if (counts > 1).any():
                raise LatentRagError(f"{path}: ids with two vectors: {_named(table.id_of(unique[counts > 1]))}")
            _place(work, rows, vectors, count, chunk_size)
            _save_npy_any(rows_file, rows.astype(np.int64))
            del ids, vectors, rows
            bar.update(1)
        bar.close()
        _check_coverage(work, len(paths), count, table, tsv)
        chunks = [_chunk_path(work, c) for c in range((count + chunk_size - 1) // chunk_size)]
        return job.finish(chunks, dim, count, encoder_identity, str(tsv), encoder_source, progress)

    return _run(job, body)


def _place(work: Path, rows: np.ndarray, vectors: np.ndarray, count: int, chunk_size: int) -> None:
    """Write each vector at its store row, in the chunk files that row range belongs to."""
    order = np.argsort(rows, kind="stable")
    rows, vectors = rows[order], vectors[order]
    chunk_of = rows // chunk_size
    for c in np.unique(chunk_of):
        sel = chunk_of == c
        start = int(c) * chunk_size
        arr = _chunk_memmap(work, int(c), min(chunk_size, count - start), vectors.shape[1])
        arr[rows[sel] - start] = vectors[sel]
        arr.flush()
        del arr


def _check_coverage(work: Path, shards: int, count: int, table: _IdTable, tsv: Path) -> None:
    """Every passage got exactly one vector, across all shards."""
    seen = np.zeros(count, dtype=np.int32)
    for s in range(shards):
        rows = np.load(work / f"shard-{s:05d}.rows.npy")
        seen[rows] += 1
    twice = np.flatnonzero(seen > 1)
    if len(twice):
        raise LatentRagError(f"ids with vectors in two shards: {_named(table.id_of(twice[:_SHOWN]))} "
                             f"({len(twice)} in all)")
    none = np.flatnonzero(seen == 0)
    if len(none):
        raise LatentRagError(
            f"passages in {tsv} with no vector in the shards: {_named(table.id_of(none[:_SHOWN]))}"
            f"{'' if len(none) <= _SHOWN else f' ({len(none)} in all)'}; give every shard, or a passages file "
            "restricted to the shards' ids"
        )


# ---- Hugging Face datasets Arrow -------------------------------------------------------------------------
def hf_arrow_files(source: str | Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder (in its state.json order), a folder of them, or one file."""
    source = Path(source).expanduser()
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise LatentRagError(f"{source} does not exist: give a `datasets` save_to_disk folder or an .arrow file")
    if (source / "dataset_dict.json").exists():
        splits = json.loads((source / "dataset_dict.json").read_text()).get("splits", [])
        raise LatentRagError(f"{source} holds several splits {splits}: give one split's folder, e.g. {source}/train")
    state = source / "state.json"
    if state.exists():
        files = [source / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        if files:
            return files
    files = sorted(source.glob("*.arrow"))
    if not files:
        raise LatentRagError(f"{source} holds no .arrow files: give a `datasets` save_to_disk folder")
    return files


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of an Arrow stream (what `datasets` writes) or file, memory-mapped."""
    try:
        source = pa.memory_map(str(path), "r")
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader
    except (OSError, pa.ArrowInvalid) as e:
        raise LatentRagError(f"{path}: not a readable Arrow file ({e})") from e


def _columns(batch: pa.RecordBatch, path: Path) -> None:
    missing = [c for c in ("title", "text", "embeddings") if c not in batch.schema.names]
    if missing:
        raise LatentRagError(f"{path}: no column {missing} (columns {batch.schema.names}); the data set needs "
                             "title, text and embeddings, as Hugging Face's CustomHFIndex reads")


def _embeddings(column: pa.Array, path: Path) -> np.ndarray:
    """A list<float> column -> (n, d) float32 (zero-copy where the layout allows)."""
    if column.null_count:
        raise LatentRagError(f"{path}: {column.null_count} rows have no embedding")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.diff(np.asarray(column.offsets))
        if len(lengths) and (lengths != lengths[0]).any():
            raise LatentRagError(f"{path}: embeddings of several lengths {sorted(set(lengths.tolist()))[:5]}")
        dim = int(lengths[0]) if len(lengths) else 0
    else:
        raise LatentRagError(f"{path}: the embeddings column is {column.type}, expected a list of floats")
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(column), dim)


def _hf_passages(files: list[Path]) -> Iterator[Passage]:
    row = 0
    for path in files:
        for batch in _arrow_batches(path):
            _columns(batch, path)
            titles = batch.column("title").to_pylist()
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [
                str(row + i) for i in range(batch.num_rows)]
            for pid, title, text in zip(ids, titles, texts, strict=True):
                yield Passage(str(pid), title or "", text or "")
            row += batch.num_rows


def import_hf_dataset(
    source: str | Path,
    directory: str | Path,
    encoder_identity: dict,
    index_type: str = "flat",
    *,
    exact_vectors: bool | None = None,
    resume: bool = False,
    chunk_size: int = IMPORT_CHUNK_SIZE,
    encoder_source: str | None = None,
    progress: bool = False,
) -> DenseIndex:
    """An index from a Hugging Face `datasets` folder/Arrow files with title, text, embeddings (e.g. wiki_dpr).

    encoder_source: what `index add` should load as the document tower (default: the identity's name).
    Row i of the data set is passage i and vector i (ids from its `id` column, else the row number).
    Streamed: one record batch and one chunk of vectors in memory at a time; resume skips saved chunks.
    """
    if chunk_size < 1:
        raise LatentRagError(f"chunk size must be positive, got {chunk_size}")
    files = hf_arrow_files(source)
    settings = {"source": "hf", "files": [_file_key(p) for p in files], "chunk_size": chunk_size,
                "encoder": dict(encoder_identity)}
    job = _Import(directory, index_type, exact_vectors, settings, resume)

    def body() -> DenseIndex:
        work = job.work
        if job.state is None:
            count, digest, blocks = _write_passages(_hf_passages(files), work / PASSAGES)
            if count == 0:
                raise LatentRagError(f"{source} holds no rows: nothing to import")
            _IdTable.from_chunks(blocks)  # refuses duplicate ids
            del blocks
            job.save_state(count=count, corpus_sha256=digest)
        count = job.state["count"]
        chunks: list[Path] = []
        buffer: list[np.ndarray] = []
        buffered = 0
        dim = None
        bar = tqdm(total=count, desc="importing vectors", unit="passage", disable=not progress)

        def flush(rows: int) -> None:
            nonlocal buffer, buffered
            block = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            path = _chunk_path(work, len(chunks))
            if not _chunk_ok(path, rows, dim):
                _save_npy(path, block[:rows])
            chunks.append(path)
            rest = block[rows:]
            buffer, buffered = ([rest] if len(rest) else []), len(rest)
            bar.update(rows)

        for path in files:
            for batch in _arrow_batches(path):
                _columns(batch, path)
                vectors = _embeddings(batch.column("embeddings"), path)
                if dim is None:
                    dim = vectors.shape[1]
                    job.check_dim(dim, encoder_identity, str(path))
                elif vectors.shape[1] != dim:
                    raise LatentRagError(f"{path}: embeddings of dimension {vectors.shape[1]}, earlier rows {dim}")
                buffer.append(vectors)
                buffered += len(vectors)
                while buffered >= chunk_size:
                    flush(chunk_size)
        if buffered:
            flush(buffered)
        bar.close()
        total = sum(np.load(p, mmap_mode="r").shape[0] for p in chunks)
        if total != count or dim in (None, 0):
            raise LatentRagError(f"{source}: {total} embeddings for {count} passages")
        return job.finish(chunks, dim, count, encoder_identity, str(source), encoder_source, progress)

    return _run(job, body)


# ---- the document encoder the vectors came from -------------------------------------------------------------
def document_encoder_identity(name: str, dim: int | None = None, *, load: bool = True) -> dict:
    """The identity an index manifest and a model's retriever compare: the named tower's weights fingerprint
    when it can be loaded (a folder, or a hub name with a network), else its name alone ("unverified").

    Importing and loading a model use this same function, so the pair agrees either way; with a network,
    `facebook/dpr-ctx_encoder-single-nq-base` is fingerprinted from its weights like any built index.
    """
    if load:
        from latentrag.retrieval.encoders import DenseEncoder

        if Path(name).expanduser().exists():  # a folder that fails to load is an error, not a name
            try:
                return DenseEncoder.from_pretrained(str(Path(name).expanduser())).identity()
            except (OSError, ValueError) as e:
                raise LatentRagError(f"cannot load encoder '{name}': {e}") from e
        try:
            return DenseEncoder.from_pretrained(name).identity()
        except (LatentRagError, OSError, ValueError):
            pass
    dim = dim or declared_dim(name)
    return {"name": name, "sha256": f"unverified-name:{name}", "dim": dim, "pooling": "pooler", "normalize": False,
            "verified": False}


def declared_dim(name: str) -> int | None:
    """The vector dimension a named encoder declares in its config (a folder, or a bundled name such as
    'minilm'), read without loading its weights; None when it is not at hand."""
    from latentrag.assets import resolve_encoder
    from latentrag.retrieval.encoders import read_sentence_transformers

    try:
        path = Path(resolve_encoder(name)).expanduser()
        if not path.is_dir():
            return None
        model_dir = Path(read_sentence_transformers(path)[0])
        config = json.loads((model_dir / "config.json").read_text())
    except (LatentRagError, OSError, ValueError, TypeError):
        return None
    projection = config.get("projection_dim") or 0
    dim = projection if projection > 0 else config.get("hidden_size")
    return int(dim) if isinstance(dim, int) else None


def import_index(
    out: str | Path,
    encoder_name: str,
    *,
    dpr_embeddings: str | Path | Iterable[str | Path] | None = None,
    passages: str | Path | None = None,
    hf_dataset: str | Path | None = None,
    load_encoder: bool = True,
    index_type: str = "flat",
    exact_vectors: bool | None = None,
    resume: bool = False,
    chunk_size: int = IMPORT_CHUNK_SIZE,
    progress: bool = True,
) -> DenseIndex:
    """`latentrag index import`: DPR shards + passages TSV, or a HF datasets folder, into an index at `out`,
    recording `encoder_name` (fingerprinted from its weights when `load_encoder` and it loads) as the
    document tower. Inputs and the target are checked before anything is read."""
    if (dpr_embeddings is None) == (hf_dataset is None):
        raise LatentRagError("give either --dpr-embeddings GLOB with --passages TSV, or --hf-dataset DIR")
    if dpr_embeddings is not None and not passages:
        raise LatentRagError("--dpr-embeddings needs --passages psgs_w100.tsv (the passages the vectors encode)")
    from latentrag.retrieval.index.build import check_index_target
    from latentrag.retrieval.index_plan import index_type as _index_type

    check_index_target(out)
    _index_type(index_type)
    identity = document_encoder_identity(encoder_name, load=load_encoder)
    local = Path(encoder_name).expanduser()
    options = dict(index_type=index_type, exact_vectors=exact_vectors, resume=resume, chunk_size=chunk_size,
                   progress=progress, encoder_source=str(local.resolve()) if local.exists() else encoder_name)
    if dpr_embeddings is not None:
        return import_dpr_embeddings(dpr_embeddings, passages, out, identity, **options)
    return import_hf_dataset(hf_dataset, out, identity, **options)
