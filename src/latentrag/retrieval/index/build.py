"""Building an index: encode passages in chunks with the frozen document tower, assemble, swap in atomically.

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
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from latentrag.assets import DEFAULT_CORPUS, DEFAULT_ENCODER, default_index_dir
from latentrag.atomic import atomic_path, atomic_write_text, fsync_dir, replace_dir
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import (
    PASSAGE_WORDS,
    Passage,
    PassageStore,
    passage_digest,
    write_passage_store,
)
from latentrag.retrieval.encoders import DenseEncoder
from latentrag.retrieval.index.dense_index import DenseIndex
from latentrag.retrieval.index.faiss_io import apply_search_params, limit_threads
from latentrag.retrieval.index.manifest import EXACT, FORMAT, MANIFEST, PASSAGES, VECTORS, Manifest
from latentrag.retrieval.index_plan import default_params, factory_string
from latentrag.retrieval.index_plan import index_type as _index_type

STATE = "state.json"
CHUNK_SIZE = 4096


def _work_dir(directory: Path, kind: str) -> Path:
    return directory.parent / f".{directory.name}.{kind}"


def _prepare_build(directory, index_type: str, exact_vectors: bool | None):
    """Shared set-up of every build: the index type, whether exact vectors are kept, a safe target, threads,
    and the work folder beside the target."""
    kind = _index_type(index_type)
    exact = (not kind.exact_reconstruct) if exact_vectors is None else bool(exact_vectors)
    directory = check_index_target(directory)
    limit_threads()
    return kind, exact, directory, _work_dir(directory, "build")


def check_index_target(directory: str | Path) -> Path:
    """Refuse, before anything is read or encoded, a folder an index cannot be written to (returned expanded).

    The target must not be a file, lie under a file, be the current folder (or hold it), or be a non-empty
    folder that is not an index; it (if present) and the folder it is created in must be writable: the
    build works in `.<name>.build/` beside it and renames the finished folder into place.
    """
    directory = Path(directory).expanduser()
    resolved = directory.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise LatentRagError(
            f"'{directory}' is the current folder{'' if resolved == cwd else ' or holds it'}: an index build "
            "replaces its target folder; give a new folder, e.g. --out ./my-index"
        )
    if directory.exists() and not directory.is_dir():
        raise LatentRagError(f"{directory} is a file: give a folder for the index")
    existing = resolved.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LatentRagError(f"{existing} is a file, so no index folder can be made under it: give another --out")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise LatentRagError(
            f"{directory} is a non-empty folder that is not a latentrag index: refusing to replace it; "
            "give a new or empty folder"
        )
    for folder in ([resolved] if resolved.exists() else []) + [existing]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LatentRagError(f"{folder} is not writable: give an index folder where you can write")
    return directory


def _make_work_dir(work: Path) -> None:
    try:
        work.mkdir(parents=True)
    except OSError as e:
        raise LatentRagError(f"cannot create the work folder {work} ({e.strerror}): give another index folder") from e


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
    apply_search_params(index, params)
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


def begin_build(work: Path, passages: Iterable[Passage], settings: dict, resume: bool,
                check=None) -> tuple[dict, bool]:
    """Start a build's work folder (passage store, settings, corpus fingerprint, build id), or with `resume`
    check that the interrupted build there used the same settings and corpus. Returns (state, resumed).
    `check(count)` may refuse the corpus before anything is encoded; a refused start leaves no work folder."""
    state = _load_state(work) if resume else None
    if state is not None and state.get("settings") != settings:
        raise LatentRagError(
            f"cannot resume: the interrupted build in {work} used other settings ({state.get('settings')}); "
            "build without --resume to start over"
        )
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        _make_work_dir(work)
        try:
            count, digest = _stream_passages(passages, work / PASSAGES)
            if count == 0:
                raise LatentRagError("the corpus holds no passages: nothing to index")
            if check is not None:
                check(count)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing half-written remains
            raise
        state = {"settings": settings, "corpus_sha256": digest, "count": count, "build_id": uuid.uuid4().hex}
        atomic_write_text(work / STATE, json.dumps(state, indent=2))
        return state, False
    count, digest = _stream_passages(passages, None)
    if digest != state["corpus_sha256"] or count != state["count"]:
        raise LatentRagError(
            f"cannot resume: the corpus differs from the one the interrupted build in {work} started with "
            f"({count} passages now, {state['count']} then); build without --resume to start over"
        )
    return state, True


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
    state, resumed = begin_build(work, passages, settings, resume)
    count = state["count"]
    if resumed and _finish(work, directory, state["build_id"]):
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
    _make_work_dir(work)
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
    base = DenseIndex.load(directory, mmap=False)  # refuses an inconsistent index before anything is written
    manifest = base.manifest
    identity = encoder.identity()
    if identity.get("sha256") != manifest.encoder.get("sha256") or encoder.dim != manifest.dim:
        raise LatentRagError(
            f"{directory} was built by document encoder '{manifest.encoder.get('name')}' "
            f"(sha256 {str(manifest.encoder.get('sha256'))[:12]}…, dim {manifest.dim}); '{identity.get('name')}' "
            f"(sha256 {identity['sha256'][:12]}…, dim {encoder.dim}) encodes into another space: use the same encoder"
        )
    check_index_target(directory)
    base_index, base_store, base_vectors = base.faiss, base.store, base.vectors
    del base
    work = _work_dir(directory, "add")
    shutil.rmtree(work, ignore_errors=True)
    _make_work_dir(work)
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


def _encoder_source(encoder: str) -> str:
    """What `index add` reloads the tower from: a folder's absolute path, else the name as given."""
    return str(Path(encoder).expanduser().resolve()) if Path(encoder).expanduser().exists() else encoder


def build_corpus_index(
    corpus: str | Path = DEFAULT_CORPUS,
    out: str | Path | None = None,
    index_type: str = "flat",
    passage_words: int = PASSAGE_WORDS,
    encoder: str = DEFAULT_ENCODER,
    batch_size: int = 64,
    progress: bool = True,
    *,
    resume: bool = False,
    chunk_size: int = CHUNK_SIZE,
    exact_vectors: bool | None = None,
) -> DenseIndex:
    """Read a corpus, split it into passages of `passage_words` words and build an index (`index build`).

    out: the index folder; by default `assets.default_index_dir(corpus, index_type, encoder)` in the cache.
    The target is checked before the encoder is loaded or anything is encoded.
    """
    from latentrag.retrieval.corpus import read_corpus, split_passages
    from latentrag.retrieval.encoders import freeze

    if passage_words < 1:
        raise LatentRagError(f"passage_words must be at least 1, got {passage_words}")
    _index_type(index_type)
    source = str(corpus) if str(corpus) == DEFAULT_CORPUS else str(Path(corpus).expanduser().resolve())
    directory = check_index_target(default_index_dir(corpus, index_type, encoder) if out is None else out)
    if out is None and (directory / MANIFEST).exists():
        previous = Manifest.read(directory).corpus
        if previous not in (None, source):  # two corpora with one file name share a default folder
            raise LatentRagError(
                f"the default folder {directory} holds the index of another corpus ({previous}): give --out, "
                "or delete that folder to replace it"
            )
    tower = freeze(DenseEncoder.from_pretrained(encoder))
    passages = split_passages(read_corpus(corpus), words=passage_words)
    return build_index(
        passages, tower, directory, index_type=index_type, batch_size=batch_size, progress=progress, resume=resume,
        chunk_size=chunk_size, exact_vectors=exact_vectors, corpus=source, passage_words=passage_words,
        encoder_source=_encoder_source(encoder),
    )


def add_corpus_to_index(
    directory: str | Path,
    corpus: str | Path,
    encoder: str | None = None,
    passage_words: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[DenseIndex, int]:
    """Read and split a corpus and append its passages to an index (`index add`); returns (index, added).

    The encoder and passage length default to the ones the manifest records. The index is loaded and
    checked (counts, files) before the encoder is loaded or anything is encoded.
    """
    from latentrag.retrieval.corpus import read_corpus, split_passages
    from latentrag.retrieval.encoders import freeze

    directory = Path(directory).expanduser()
    manifest = DenseIndex.load(directory).manifest  # an inconsistent index is refused here
    check_index_target(directory)
    words = passage_words or manifest.passage_words or PASSAGE_WORDS
    if words < 1:
        raise LatentRagError(f"passage_words must be at least 1, got {words}")
    tower = freeze(DenseEncoder.from_pretrained(
        encoder or manifest.encoder_source or manifest.encoder.get("name", DEFAULT_ENCODER)))
    passages = split_passages(read_corpus(corpus), words=words)
    index = add_to_index(directory, passages, tower, batch_size=batch_size, progress=progress)
    return index, len(index) - manifest.count


def default_index(progress: bool = True) -> Path:
    """The bundled wiki-leads flat index in the cache, built once (about a minute on a laptop) and reused."""
    directory = default_index_dir()
    if not (directory / MANIFEST).exists():
        build_corpus_index(DEFAULT_CORPUS, directory, progress=progress)
    return directory
