"""A sharded index searched by Ray actors: fan-out, exact top-k merge, the searcher interface of `DenseIndex`.

On disk a sharded index is a folder of ordinary index folders, `shard-000/`, `shard-001/`, ..., each holding
a contiguous range of the corpus rows, and one top-level `manifest.json`: the fields of `Manifest` for the
whole index (encoder identity, dimension, total count, ...) plus `shards`, the folder, first global row and
count of each. Global row `start + i` is row `i` of its shard, so ids equal those of a single index built
over the same passages in the same order.

`ShardedIndex` places one Ray actor per shard (`ShardServer`, which loads the shard with `DenseIndex.load`),
sends every query batch to all of them and merges their top-k lists. Each shard's top-k holds every global
top-k member that lives in it, so the merged top-k of the union is exact: for flat shards the ids and the
scores (d(z)ᵀq(x), paper §2.2) are those of one flat index over the union. Equal scores are ordered as faiss
orders them (higher id first); where exactly tied scores straddle the k-th place, which of them a flat index
keeps is not specified by faiss either, so only there may the two differ.

A shard actor that dies is restarted by Ray (`max_restarts`) and its call retried (`max_task_retries`); if
Ray gives up, the actor is re-created once from the shard folder and the query sent again. An error that
still reaches the user names the shard and its folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from latentrag.atomic import atomic_write_text, fsync_dir, replace_dir
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage, PassageStore
from latentrag.retrieval.index.build import build_index_from_vectors
from latentrag.retrieval.index.dense_index import DenseIndex
from latentrag.retrieval.index.manifest import MANIFEST, Manifest

SHARD_NAME = "shard-{:03d}"


# ---- the layout -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """One shard: its folder (relative to the sharded index) and its range of global rows."""

    directory: str
    start: int
    count: int


def is_sharded(directory: str | Path) -> bool:
    path = Path(directory).expanduser() / MANIFEST
    try:
        return path.exists() and "shards" in json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_sharded(directory: str | Path) -> tuple[Manifest, list[ShardSpec]]:
    """The top-level manifest and the shards of a sharded index folder, checked for contiguous coverage."""
    directory = Path(directory).expanduser()
    manifest = Manifest.read(directory)
    try:
        shards = [ShardSpec(**s) for s in json.loads((directory / MANIFEST).read_text()).get("shards", [])]
    except (TypeError, json.JSONDecodeError) as e:
        raise LatentRagError(f"{directory / MANIFEST}: unreadable shard list ({e}); rebuild the index") from e
    if not shards:
        raise LatentRagError(
            f"{directory} is a single index, not a sharded one: load it with DenseIndex.load (drop --ray), "
            "or build a sharded one with `latentrag index build --ray --shards N`"
        )
    expected = 0
    for s, spec in enumerate(shards):
        if spec.start != expected or spec.count < 1:
            raise LatentRagError(f"{directory}: shard {s} covers rows {spec.start}.. but {expected} was next; rebuild")
        expected += spec.count
    if expected != manifest.count:
        raise LatentRagError(f"{directory}: the shards hold {expected} rows, the manifest says {manifest.count}")
    return manifest, shards


def sharded_info(directory: str | Path) -> dict:
    """The top-level manifest of a sharded index with each shard's folder, rows and bytes on disk."""
    directory = Path(directory).expanduser()
    manifest, shards = read_sharded(directory)
    rows = []
    for spec in shards:
        files = [f for f in (directory / spec.directory).iterdir() if f.is_file()]
        rows.append({**asdict(spec), "bytes": sum(f.stat().st_size for f in files)})
    return {"directory": str(directory), **asdict(manifest), "shards": rows,
            "total_bytes": sum(r["bytes"] for r in rows)}


def shard_bounds(count: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous row ranges of near-equal size covering 0..count-1."""
    if not 1 <= shards <= count:
        raise LatentRagError(f"--shards must be between 1 and the number of passages ({count}), got {shards}")
    edges = np.linspace(0, count, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _passages(store: PassageStore, start: int, stop: int) -> Iterator[Passage]:
    for batch in store.table.slice(start, stop - start).to_batches():
        for pid, title, text in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            yield Passage(pid, title, text)


def assemble_shards(
    out: Path,
    store: PassageStore,
    vectors: Callable[[int, int], np.ndarray],
    manifest: Manifest,
    shards: int,
    exact_vectors: bool | None = None,
) -> None:
    """Write `shards` index folders and the top-level manifest (last) into the empty folder `out`.

    `vectors(a, b)` gives the (b-a, d) float32 vectors of rows a..b-1; each shard is an ordinary index folder
    built by `build_index_from_vectors` with the manifest's encoder identity and index type.
    """
    specs = []
    for s, (a, b) in enumerate(shard_bounds(len(store), shards)):
        name = SHARD_NAME.format(s)
        build_index_from_vectors(vectors(a, b), _passages(store, a, b), out / name, manifest.encoder,
                                 manifest.index_type, exact_vectors=exact_vectors)
        specs.append(ShardSpec(name, a, b - a))
    record = {**asdict(manifest), "shards": [asdict(s) for s in specs]}
    atomic_write_text(out / MANIFEST, json.dumps(record, indent=2))
    fsync_dir(out)


def finish_sharded(work: Path, directory: Path, build_id: str) -> bool:
    """Swap `work/out` (assembled, manifest written) into place; True when the index with `build_id` is there."""
    out = work / "out"
    if (out / MANIFEST).exists() and Manifest.read(out).build_id == build_id:
        replace_dir(out, directory)
        shutil.rmtree(work, ignore_errors=True)
        return True
    if (directory / MANIFEST).exists() and Manifest.read(directory).build_id == build_id:
        shutil.rmtree(work, ignore_errors=True)
        return True
    return False


def build_sharded_from_vectors(
    vectors: np.ndarray,
    passages,
    directory: str | Path,
    encoder_identity: dict,
    shards: int,
    index_type: str = "flat",
    exact_vectors: bool | None = None,
) -> Path:
    """A sharded index folder from vectors already computed (row i encodes passage i), written atomically:
    the folder is replaced in one rename once every shard and the manifest are complete."""
    from latentrag import __version__
    from latentrag.retrieval.corpus import write_passage_store
    from latentrag.retrieval.index.build import check_index_target
    from latentrag.retrieval.index_plan import default_params, factory_string

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise LatentRagError(f"vectors must be (N, d), got shape {vectors.shape}")
    directory = check_index_target(directory)
    work = directory.parent / f".{directory.name}.shard-build"
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    try:
        count = write_passage_store(work / "passages.arrow", passages)
        if count != len(vectors) or count == 0:
            raise LatentRagError(f"{len(vectors)} vectors for {count} passages: give one vector per passage")
        params = default_params(index_type, count, vectors.shape[1])
        manifest = Manifest(encoder=dict(encoder_identity), dim=vectors.shape[1], count=count, index_type=index_type,
                            factory=factory_string(index_type, params), version=__version__, params=params,
                            build_id=uuid.uuid4().hex)
        assemble_shards(work / "out", PassageStore(work / "passages.arrow"), lambda a, b: vectors[a:b], manifest,
                        shards, exact_vectors)
        finish_sharded(work, directory, manifest.build_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


# ---- the actor --------------------------------------------------------------------------------------------
class ShardServer:
    """One shard in one Ray actor: local searches whose ids come back as global rows."""

    def __init__(self, directory: str, start: int, threads: int = 1):
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self.index = DenseIndex.load(directory)
        self.start = start

    def size(self) -> int:
        return len(self.index)

    def search(self, queries: np.ndarray, k: int, with_vectors: bool):
        scores, ids = self.index.search(queries, min(k, len(self.index)))
        vectors = self.index.reconstruct(np.maximum(ids, 0)) if with_vectors else None
        return scores, np.where(ids >= 0, ids + self.start, -1), vectors

    def reconstruct(self, local: np.ndarray) -> np.ndarray:
        return self.index.reconstruct(local)

    def passages(self, local: list[int]) -> list[Passage]:
        return self.index.store.get(local)

    def pid(self) -> int:
        import os

        return os.getpid()


def _last_line(error: BaseException) -> str:
    """The innermost message of a Ray error (its last non-empty line, colour codes removed)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---- the searcher -------------------------------------------------------------------------------------------
class ShardedIndex:
    """The `DenseIndex` searcher interface over shards served by Ray actors (one actor per shard).

    Pickles as its folder and actor handles, so Ray tasks and other processes of the same cluster can use it.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        address: str | None = None,
        num_cpus: float = 0.25,
        threads: int = 1,
        max_restarts: int = 2,
        start_timeout: float = 300.0,
    ):
        """Start the shard actors of the sharded index folder `directory` on the Ray cluster at `address`
        (None: a local one). `num_cpus` is each actor's CPU request (fractions pack several per core; an
        actor that cannot be placed within `start_timeout` seconds is an error, not a hang); `threads` the
        torch/faiss threads each actor searches with."""
        from latentrag.distributed.cluster import connect

        self.directory = Path(directory).expanduser().resolve()
        self.manifest, self.shards = read_sharded(self.directory)
        self._options = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": max_restarts}
        self._threads = threads
        ray = connect(address)
        self._actors = [self._spawn(s) for s in range(len(self.shards))]
        refs = [a.size.remote() for a in self._actors]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=start_timeout)
        if waiting:
            late = [s for s, ref in enumerate(refs) if ref in waiting]
            free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
            self.close()
            raise LatentRagError(
                f"shards {late} of {self.directory} did not start within {start_timeout:.0f} s: each actor asks for "
                f"{num_cpus} CPU and the cluster has {free:g} of {total:g} CPUs free; ask for less (num_cpus) "
                "or add nodes"
            )
        try:  # a shard that fails its size check (or cannot start) releases every actor started
            sizes = [self._call(s, lambda a: a.size.remote(), ref) for s, ref in enumerate(refs)]
            for s, (spec, size) in enumerate(zip(self.shards, sizes, strict=True)):
                if size != spec.count:
                    raise LatentRagError(f"shard {s} ({self.directory / spec.directory}) holds {size} passages, "
                                         f"the manifest says {spec.count}; rebuild the index")
        except BaseException:
            self.close()
            raise
        self._starts = np.array([s.start for s in self.shards] + [self.manifest.count], dtype=np.int64)
        del ray

    def _spawn(self, s: int):
        import ray

        actor_class = ray.remote(ShardServer).options(**self._options)
        return actor_class.remote(str(self.directory / self.shards[s].directory), self.shards[s].start, self._threads)

    def _call(self, s: int, submit: Callable, ref=None):
        """The result of `submit(actor)` on shard s; one re-creation of a dead actor; errors name the shard."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        where = f"shard {s} ({self.directory / self.shards[s].directory})"
        for attempt in range(2):
            try:
                return ray.get(ref if ref is not None else submit(self._actors[s]))
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, Exception) else e
                if isinstance(cause, RayActorError):  # the actor's constructor failed (e.g. its folder is gone)
                    error = cause
                else:
                    raise LatentRagError(f"{where}: {cause}") from e
            except RayActorError as e:
                error = e
            ref = None
            if attempt == 0:  # Ray's restarts are used up: a fresh actor from the shard folder, and ask again
                with contextlib.suppress(Exception):  # the old one, should it still be restarting
                    ray.kill(self._actors[s], no_restart=True)
                self._actors[s] = self._spawn(s)
        raise LatentRagError(
            f"{where} failed and a restarted actor failed again ({_last_line(error)}); check that the shard "
            "folder is readable on every node and that the node has memory for the shard"
        ) from error

    # the searcher interface --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    def _check(self, queries: np.ndarray, k: int) -> np.ndarray:
        if not 1 <= k <= len(self):
            raise LatentRagError(f"k must be between 1 and the index size {len(self)}, got {k}")
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise LatentRagError(f"query vectors have shape {queries.shape}, the index expects (*, {self.dim})")
        return np.ascontiguousarray(queries, dtype=np.float32)

    def search_with_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """queries (B,d) -> scores (B,k), global ids (B,k), stored vectors d(z) (B,k,d), in one round trip."""
        return self._search(queries, k, True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B,d) float32 -> scores (B,k), global row ids (B,k), best first: the exact merge of the
        shards' top-k lists (equal scores: higher id first, as faiss)."""
        scores, ids, _ = self._search(queries, k, False)
        return scores, ids

    def _search(self, queries: np.ndarray, k: int, with_vectors: bool):
        import ray

        queries = ray.put(self._check(queries, k))
        refs = [a.search.remote(queries, k, with_vectors) for a in self._actors]
        parts = [self._call(s, lambda a: a.search.remote(queries, k, with_vectors), ref)
                 for s, ref in enumerate(refs)]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.lexsort((np.where(ids >= 0, -ids, 1), -scores), axis=1)[:, :k]  # ties: higher id first, as faiss
        top_scores, top_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        if not with_vectors:
            return top_scores, top_ids, None
        vectors = np.concatenate([p[2] for p in parts], axis=1)
        return top_scores, top_ids, np.take_along_axis(vectors, order[:, :, None], 1)

    def _by_shard(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise LatentRagError(f"passage ids out of range for an index of {len(self)}")
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        return shard, flat - self._starts[shard]

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored document vectors d(z) for global ids (B,k) -> (B,k,d), fetched from the shards holding them."""
        ids = np.asarray(ids)
        shard, local = self._by_shard(ids)
        out = np.empty((shard.size, self.dim), dtype=np.float32)
        for s in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == s)
            out[rows] = self._call(s, lambda a, r=local[rows]: a.reconstruct.remote(r))
        return out.reshape(*ids.shape, self.dim)

    def passages(self, ids: np.ndarray) -> list[list[Passage]]:
        ids = np.asarray(ids)
        shard, local = self._by_shard(ids)
        found: list[Passage | None] = [None] * shard.size
        for s in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == s)
            wanted = local[rows].tolist()
            got = self._call(s, lambda a, r=wanted: a.passages.remote(r))
            for row, passage in zip(rows.tolist(), got, strict=True):
                found[row] = passage
        width = ids.shape[-1] if ids.ndim else 1
        return [found[i : i + width] for i in range(0, len(found), width)]

    def close(self) -> None:
        """Stop the shard actors (they also stop when the driver disconnects)."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
