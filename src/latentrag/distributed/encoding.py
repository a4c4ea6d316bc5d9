"""Encoding a corpus on a Ray cluster: a `ray.data` pipeline of batched document-tower inference on actors,
written as a sharded index (see `sharded`).

The passage store is written first (one pass over the corpus, its fingerprint kept for resuming). Its rows
are cut into blocks of `chunk_size`; the blocks not yet encoded become a `ray.data` dataset whose
`map_batches` runs on a pool of `workers` encoder actors (each holds one copy of the frozen tower, shipped
once through the object store, and encodes with `encode_passages`, the single-process code). The driver
saves each block's vectors atomically as it completes, so a build interrupted at any point resumes
(`resume=True`) by encoding only the missing blocks. The shards are then assembled from the saved blocks
into a work folder that replaces the target in one rename, manifest last: the same ids and passages as
`build_index` over the same corpus, vectors equal within float tolerance (batches pad differently).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from latentrag.assets import DEFAULT_CORPUS, DEFAULT_ENCODER, default_index_dir
from latentrag.defaults import PASSAGE_WORDS
from latentrag.distributed.cluster import connect
from latentrag.distributed.sharded import assemble_shards, finish_sharded, shard_bounds
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage, PassageStore
from latentrag.retrieval.encoders import DenseEncoder
from latentrag.retrieval.index.build import (
    CHUNK_SIZE,
    _chunk_ok,
    _chunk_path,
    _prepare_build,
    _save_npy,
    begin_build,
    encode_passages,
)
from latentrag.retrieval.index.manifest import FORMAT, PASSAGES, Manifest
from latentrag.retrieval.index_plan import default_params, factory_string


@dataclass
class EncodeReport:
    """What a distributed build did: blocks encoded now vs. reused from an interrupted run, and how long."""

    directory: Path
    passages: int
    shards: int
    encoded_blocks: int
    reused_blocks: int
    encode_seconds: float
    total_seconds: float
    first_block_seconds: float = 0.0  # encoding start to the first saved block: mostly actor start-up
    actor_seconds: float = 0.0  # time the actors spent inside `encode_passages`, summed over actors


class BlockEncoder:
    """A `ray.data` actor: the frozen document tower, encoding (title, text) batches with `encode_passages`."""

    def __init__(self, encoder_ref: list, batch_size: int, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.encoder = ray.get(encoder_ref[0])
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        vectors = encode_passages(self.encoder, batch["title"].tolist(), batch["text"].tolist(), self.batch_size)
        seconds = np.full(len(vectors), (time.perf_counter() - started) / max(1, len(vectors)))
        return {"row": batch["row"], "vector": vectors, "seconds": seconds}


def _encode_missing(
    store: PassageStore,
    encoder: DenseEncoder,
    work: Path,
    bounds: list[tuple[int, int]],
    missing: list[int],
    *,
    batch_size: int,
    workers: int,
    num_cpus: float,
    threads: int,
    progress: bool,
) -> tuple[float, float]:
    """Encode the blocks `missing` on a pool of actors, saving each block's vectors as soon as it is whole.
    Returns when (perf_counter) the first block was saved and the actors' summed encoding seconds."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    tables = []
    for c in missing:
        a, b = bounds[c]
        part = store.table.slice(a, b - a).select(["title", "text"])
        tables.append(part.append_column("row", pa.array(np.arange(a, b, dtype=np.int64))))
    chunk = bounds[0][1] - bounds[0][0]
    encoder_ref = ray.put(encoder)  # one copy of the weights in the object store, held until the end
    dataset = ray.data.from_arrow(tables).map_batches(
        BlockEncoder,
        fn_constructor_args=([encoder_ref], batch_size, threads),
        batch_size=chunk,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=num_cpus,
    )
    pending: dict[int, tuple[np.ndarray, int]] = {}
    first_saved = actor_seconds = 0.0
    total = sum(bounds[c][1] - bounds[c][0] for c in missing)
    with tqdm(total=total, desc="encoding (ray)", unit="passage", disable=not progress) as bar:
        for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows, vectors = out["row"], np.asarray(out["vector"], dtype=np.float32)
            actor_seconds += float(out["seconds"].sum())
            for c in np.unique(rows // chunk).tolist():
                a, b = bounds[c]
                mine = (rows >= a) & (rows < b)
                block, filled = pending.get(c, (np.empty((b - a, encoder.dim), np.float32), 0))
                block[rows[mine] - a] = vectors[mine]
                filled += int(mine.sum())
                if filled == b - a:
                    _save_npy(_chunk_path(work, c), block)  # this block never needs encoding again
                    first_saved = first_saved or time.perf_counter()
                    pending.pop(c, None)
                else:
                    pending[c] = (block, filled)
            bar.update(len(rows))
    del encoder_ref
    if pending:  # pragma: no cover - ray.data returned fewer rows than it was given
        raise LatentRagError(f"the Ray pipeline lost rows of blocks {sorted(pending)}; run again with resume=True")
    return first_saved, actor_seconds


def _rows(chunks: list[np.ndarray], chunk: int, a: int, b: int) -> np.ndarray:
    """Rows a..b-1 of the concatenation of the saved blocks (each `chunk` rows, the last maybe fewer)."""
    parts = []
    for c in range(a // chunk, (b - 1) // chunk + 1):
        lo, hi = max(a, c * chunk) - c * chunk, min(b, (c + 1) * chunk) - c * chunk
        parts.append(np.asarray(chunks[c][lo:hi]))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def build_sharded_index(
    passages: Iterable[Passage],
    encoder: DenseEncoder,
    directory: str | Path,
    shards: int,
    index_type: str = "flat",
    batch_size: int = 64,
    progress: bool = True,
    *,
    address: str | None = None,
    workers: int = 2,
    num_cpus: float = 1.0,
    threads: int = 1,
    resume: bool = False,
    chunk_size: int = CHUNK_SIZE,
    exact_vectors: bool | None = None,
    corpus: str | None = None,
    passage_words: int | None = None,
    encoder_source: str | None = None,
) -> EncodeReport:
    """Encode passages on the Ray cluster at `address` (None: a local one) with `workers` encoder actors of
    `num_cpus` CPUs and `threads` torch threads each, and write `shards` index shards and one manifest.

    resume: continue the interrupted build of the same corpus and settings, re-encoding only the blocks
    (`chunk_size` passages each) that were not saved.
    """
    from latentrag import __version__

    if chunk_size < 1 or batch_size < 1 or workers < 1 or threads < 1 or num_cpus <= 0:
        raise LatentRagError(
            f"chunk size, batch size, workers, threads and CPUs per worker must be positive (got {chunk_size}, "
            f"{batch_size}, {workers}, {threads}, {num_cpus})"
        )
    started = time.perf_counter()
    kind, exact, directory, _ = _prepare_build(directory, index_type, exact_vectors)
    work = directory.parent / f".{directory.name}.ray-build"
    identity = encoder.identity()
    settings = {"encoder": identity, "index_type": index_type, "exact_vectors": exact, "chunk_size": chunk_size,
                "batch_size": batch_size, "shards": shards, "format": FORMAT}
    state, resumed = begin_build(work, passages, settings, resume,
                                 check=lambda n: shard_bounds(n, shards))  # more shards than passages: refused
    count = state["count"]
    if resumed and finish_sharded(work, directory, state["build_id"]):
        return EncodeReport(directory, count, shards, 0, 0, 0.0, time.perf_counter() - started)
    store = PassageStore(work / PASSAGES)
    bounds = [(s, min(count, s + chunk_size)) for s in range(0, count, chunk_size)]
    missing = [c for c, (a, b) in enumerate(bounds) if not _chunk_ok(_chunk_path(work, c), b - a, encoder.dim)]
    encode_started = first_saved = time.perf_counter()
    actor_seconds = 0.0
    if missing:
        connect(address)
        first_saved, actor_seconds = _encode_missing(store, encoder, work, bounds, missing, batch_size=batch_size, workers=workers,
                        num_cpus=num_cpus, threads=threads, progress=progress)
    encode_seconds = time.perf_counter() - encode_started
    params = default_params(index_type, count, encoder.dim)
    manifest = Manifest(encoder=identity, dim=encoder.dim, count=count, index_type=index_type,
                        factory=factory_string(index_type, params), version=__version__, params=params,
                        exact_vectors=exact, corpus=corpus, passage_words=passage_words,
                        encoder_source=encoder_source, build_id=state["build_id"])
    chunks = [np.load(_chunk_path(work, c), mmap_mode="r") for c in range(len(bounds))]
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    assemble_shards(out, store, lambda a, b: _rows(chunks, chunk_size, a, b), manifest, shards, exact)
    finish_sharded(work, directory, state["build_id"])
    return EncodeReport(directory, count, shards, len(missing), len(bounds) - len(missing), encode_seconds,
                        time.perf_counter() - started, first_saved - encode_started, actor_seconds)


def build_corpus_sharded_index(
    corpus: str | Path = DEFAULT_CORPUS,
    out: str | Path | None = None,
    shards: int = 1,
    index_type: str = "flat",
    passage_words: int = PASSAGE_WORDS,
    encoder: str = DEFAULT_ENCODER,
    batch_size: int = 64,
    progress: bool = True,
    **ray_options,
) -> EncodeReport:
    """Read a corpus, split it into passages and build a sharded index on Ray (`index build --ray`).

    out: the index folder; by default the cache folder `index build` would use, suffixed `-sharded`.
    `ray_options` go to `build_sharded_index` (address, workers, num_cpus, threads, resume, chunk_size,
    exact_vectors). The target is checked before the encoder is loaded or anything is encoded.
    """
    from latentrag.retrieval.corpus import read_corpus, split_passages
    from latentrag.retrieval.encoders import freeze
    from latentrag.retrieval.index.build import _encoder_source, check_index_target
    from latentrag.retrieval.index_plan import index_type as check_type

    if passage_words < 1:
        raise LatentRagError(f"passage_words must be at least 1, got {passage_words}")
    if shards < 1:
        raise LatentRagError(f"--shards must be at least 1, got {shards}")
    check_type(index_type)
    default = default_index_dir(corpus, index_type, encoder)
    directory = check_index_target(default.with_name(default.name + "-sharded") if out is None else out)
    source = str(corpus) if str(corpus) == DEFAULT_CORPUS else str(Path(corpus).expanduser().resolve())
    tower = freeze(DenseEncoder.from_pretrained(encoder))
    passages = split_passages(read_corpus(corpus), words=passage_words)
    return build_sharded_index(passages, tower, directory, shards, index_type, batch_size, progress, corpus=source,
                               passage_words=passage_words, encoder_source=_encoder_source(encoder), **ray_options)
