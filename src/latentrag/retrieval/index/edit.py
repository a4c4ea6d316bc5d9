"""Editing an index: change a few passages, re-encode only those, copy every other vector (paper §4.5).

RAG's knowledge lives in the index, so updating a fact is an index edit, not retraining: the edited
passages are encoded again with the same frozen document tower, every other stored vector d(z) is copied
bit for bit, and the copy keeps the source's encoder identity, type and parameters, so a model paired with
the source accepts it (`RagModel.swap_index`). The copy is assembled in a work folder and put in place in
one rename (as `build_index`); `edits.json` in it records the source, the changed passages and a key, and
an unchanged request finds the finished copy and reuses it.

    replace_passages("indexes/wiki", {"Paris#0": "Lyon is the capital of France ..."}, "indexes/wiki-2",
                     model.document_encoder())
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from latentrag.atomic import atomic_write_text
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.encoders import DenseEncoder
from latentrag.retrieval.index.build import (
    _assemble,
    _chunk_path,
    _finish,
    _prepare_build,
    _save_npy,
    _stream_passages,
    _work_dir,
    encode_passages,
)
from latentrag.retrieval.index.dense_index import DenseIndex
from latentrag.retrieval.index.faiss_io import read_faiss
from latentrag.retrieval.index.manifest import MANIFEST, PASSAGES, VECTORS, Manifest

EDITS = "edits.json"
COPY_ROWS = 65536


def _normalise_edits(edits: Mapping[str, str | Passage]) -> dict[str, Passage | str]:
    if not edits:
        raise LatentRagError("no edits given: pass {passage id: new text (or a Passage with that id)}")
    out: dict[str, Passage | str] = {}
    for pid, value in edits.items():
        if isinstance(value, Passage):
            if value.id != pid:
                raise LatentRagError(f"edit for passage '{pid}' carries a Passage with id '{value.id}': ids must match")
        elif not isinstance(value, str):
            raise LatentRagError(f"edit for passage '{pid}' must be the new text or a Passage, got {type(value).__name__}")
        if not (value.text if isinstance(value, Passage) else value).strip():
            raise LatentRagError(f"edit for passage '{pid}' has no text: give the passage's new text")
        out[str(pid)] = value
    return out


def edit_key(source: Manifest, encoder_identity: dict, edits: Mapping[str, Passage]) -> str:
    """What the edited copy depends on: the source build, the encoder, and every (id, title, new text)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([source.build_id, source.count, encoder_identity.get("sha256")]).encode())
    for pid in sorted(edits):
        p = edits[pid]
        digest.update(json.dumps([pid, p.title, p.text], ensure_ascii=False).encode())
    return digest.hexdigest()


def _reusable(directory: Path, key: str) -> bool:
    if not (directory / MANIFEST).exists() or not (directory / EDITS).exists():
        return False
    try:
        return json.loads((directory / EDITS).read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def replace_passages(
    index: str | Path | DenseIndex,
    edits: Mapping[str, str | Passage],
    out: str | Path,
    encoder: DenseEncoder,
    *,
    batch_size: int = 64,
    reuse: bool = True,
    progress: bool = False,
) -> DenseIndex:
    """A copy of `index` at `out` in which the passages named in `edits` (id -> new text, or a Passage with
    the same id for a new title too) are replaced and re-encoded by `encoder`; every other vector is copied.

    `encoder` must be the document tower that built `index` (same weights sha256). `out` may be the
    source folder itself (edited in place, atomically). With `reuse`, an existing copy made from the same
    source, encoder and edits is returned as it is.
    """
    source = index if isinstance(index, DenseIndex) else DenseIndex.load(index)
    manifest = source.manifest
    identity = encoder.identity()
    if identity.get("sha256") != manifest.encoder.get("sha256") or encoder.dim != manifest.dim:
        raise LatentRagError(
            f"{source.directory} was built by document encoder '{manifest.encoder.get('name')}' "
            f"(sha256 {str(manifest.encoder.get('sha256'))[:12]}…, dim {manifest.dim}); '{identity.get('name')}' "
            f"(sha256 {str(identity.get('sha256'))[:12]}…, dim {encoder.dim}) encodes into another space: edit with "
            "the tower that built the index (a model's `document_encoder()`)"
        )
    raw = _normalise_edits(edits)
    ids = source.store.ids()
    row_of = {pid: row for row, pid in enumerate(ids)}
    unknown = [pid for pid in raw if pid not in row_of]
    if unknown:
        raise LatentRagError(
            f"{len(unknown)} edited passage id(s) are not in {source.directory} (e.g. '{unknown[0]}'): "
            "edits replace existing passages; add new ones with `add_to_index`"
        )
    old = {pid: source.store[row_of[pid]] for pid in raw}
    new = {pid: v if isinstance(v, Passage) else Passage(pid, old[pid].title, v) for pid, v in raw.items()}
    key = edit_key(manifest, identity, new)
    kind, exact, directory, _ = _prepare_build(out, manifest.index_type, manifest.exact_vectors)
    work = _work_dir(directory, "edit")  # its own: never the resumable work of a `build_index` of the same folder
    if reuse and _reusable(directory, key):
        return DenseIndex.load(directory)

    rows = np.array(sorted(row_of[pid] for pid in new), dtype=np.int64)
    pids = [ids[r] for r in rows]
    vectors = encode_passages(encoder, [new[p].title for p in pids], [new[p].text for p in pids], batch_size)
    edited_at = dict(zip(rows.tolist(), range(len(rows)), strict=True))

    def passages() -> Iterator[Passage]:
        for row, p in enumerate(source.store):
            yield new[p.id] if row in edited_at else p

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _stream_passages(passages(), work / PASSAGES)
        paths = []
        n = len(source)
        for c, start in enumerate(range(0, n, COPY_ROWS)):
            stop = min(n, start + COPY_ROWS)
            block = np.array(source.reconstruct(np.arange(start, stop)[None, :])[0], dtype=np.float32)
            inside = rows[(rows >= start) & (rows < stop)]
            for r in inside.tolist():
                block[r - start] = vectors[edited_at[r]]
            paths.append(_chunk_path(work, c))
            _save_npy(paths[-1], block)
        from latentrag import __version__

        build_id = uuid.uuid4().hex
        copy = Manifest(**{**asdict(manifest), "version": __version__, "build_id": build_id, "created": time.time()})
        fresh = faiss.index_factory(manifest.dim, manifest.factory, faiss.METRIC_INNER_PRODUCT)
        base = None
        if not fresh.is_trained:  # IVF cells / quantisers: keep the source's training, refill with the vectors
            trained = read_faiss(source.directory / VECTORS, mmap=False)
            trained.reset()
            base = (trained, None, None)
        done = _assemble(work, paths, copy, progress, base=base)
        atomic_write_text(done / EDITS, json.dumps({
            "key": key,
            "source": {"directory": str(source.directory), "build_id": manifest.build_id},
            "edited": [{"id": p, "row": int(r), "title": new[p].title, "old_text": old[p].text, "text": new[p].text}
                       for p, r in zip(pids, rows.tolist(), strict=True)],
        }, ensure_ascii=False, indent=1))
        _finish(work, directory, build_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DenseIndex.load(directory)
