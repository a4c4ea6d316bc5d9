"""`latentrag index import`: published vectors -> an index, on small files written in exactly the published formats.

DPR's release: `wikipedia_passages_*.pkl` (a pickle of a list of (id, float32 vector) tuples per shard) and
`psgs_w100.tsv` (header id, text, title; text CSV-quoted with doubled quotes). Hugging Face `datasets`:
a `save_to_disk` folder of Arrow *stream* files listed in its state.json, columns id, text, title, embeddings.
The vectors are the tiny DPR context tower's own encodings, so an import must equal `build_index`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tiny_models import tiny_dense_encoder, tiny_passages

from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.index import DenseIndex, build_index, encode_passages
from latentrag.retrieval.index.importers import (
    document_encoder_identity,
    import_dpr_embeddings,
    import_hf_dataset,
    load_dpr_shard,
)
from latentrag.retrieval.retriever import Retriever


def _passages() -> list[Passage]:
    extra = [Passage(str(100 + i), f'"Topic {i}"', f'Item {i} says "quoted {i}" and, tabs\tno; line {i}.')
             for i in range(20)]
    return tiny_passages() + extra


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """The tiny DPR context tower, saved (so it can be named by folder) and loaded back."""
    encoder = tiny_dense_encoder("dpr-context", seed=2)
    folder = tmp_path_factory.mktemp("ctx") / "dpr-ctx"
    encoder.save_pretrained(folder)
    return encoder, folder


@pytest.fixture(scope="module")
def vectors(ctx):
    ps = _passages()
    return encode_passages(ctx[0], [p.title for p in ps], [p.text for p in ps])


def write_tsv(path, passages):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        for p in passages:
            w.writerow([p.id, p.text, p.title])
    return path


def write_shards(folder, ids, vectors, parts: list[list[int]], prefix: str = ""):
    """DPR's shard format: pickle.dump(list of (id, np.float32 vector)) per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, rows in enumerate(parts):
        with open(folder / f"wikipedia_passages_{s}.pkl", "wb") as f:
            pickle.dump([(prefix + ids[r], vectors[r].copy()) for r in rows], f)
    return str(folder / "wikipedia_passages_*.pkl")


# shards hold rows out of TSV order, and not one shard per contiguous range
PARTS = [[5, 0, 29, 1, 2], [3, 4, 6, 7, 8, 9, 28, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]


@pytest.fixture(scope="module")
def dpr_files(tmp_path_factory, vectors):
    root = tmp_path_factory.mktemp("dpr")
    ps = _passages()
    tsv = write_tsv(root / "psgs_w100.tsv", ps)
    pattern = write_shards(root / "emb", [p.id for p in ps], vectors, PARTS, prefix="wiki:")
    return tsv, pattern


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ctx):
    return build_index(_passages(), ctx[0], tmp_path_factory.mktemp("ref") / "idx", progress=False)


def test_psgs_tsv_is_the_published_quoting(dpr_files):
    text = dpr_files[0].read_text()
    assert text.startswith("id\ttext\ttitle\n") and '""quoted 0""' in text and '"""Topic 0"""' in text


def test_dpr_import_equals_building_from_the_encoder(dpr_files, ctx, reference, tmp_path):
    tsv, pattern = dpr_files
    identity = document_encoder_identity(str(ctx[1]))
    assert identity["sha256"] == ctx[0].identity()["sha256"]  # the named tower's weights, fingerprinted
    index = import_dpr_embeddings(pattern, tsv, tmp_path / "idx", identity, chunk_size=7, encoder_source=str(ctx[1]))
    assert len(index) == len(reference) == 30
    assert index.passages(np.arange(30)[None])[0] == reference.passages(np.arange(30)[None])[0]
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))
    queries = np.random.default_rng(0).standard_normal((4, index.dim)).astype(np.float32)
    np.testing.assert_array_equal(index.search(queries, 5)[1], reference.search(queries, 5)[1])
    assert index.manifest.encoder["sha256"] == reference.manifest.encoder["sha256"]
    assert index.manifest.encoder_source == str(ctx[1])
    assert not (tmp_path / ".idx.import").exists()  # the work folder is gone

    # The manifest's encoder decides which query towers may use it, as for built indexes.
    q = tiny_dense_encoder("dpr-question", seed=1)
    Retriever(q, ctx[0].identity(), index)
    other = tiny_dense_encoder("dpr-context", seed=9)
    with pytest.raises(LatentRagError, match="rebuild the index"):
        Retriever(q, other.identity(), index)


@pytest.mark.parametrize("kind", ["hnsw-sq8", "ivf-pq"])
def test_dpr_import_any_index_type(kind, dpr_files, ctx, reference, tmp_path):
    tsv, pattern = dpr_files
    index = import_dpr_embeddings(pattern, tsv, tmp_path / "idx", ctx[0].identity(), kind)
    assert index.manifest.index_type == kind and index.manifest.exact_vectors
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))
    queries = np.random.default_rng(1).standard_normal((3, index.dim)).astype(np.float32)
    np.testing.assert_array_equal(index.search(queries, 3)[1], reference.search(queries, 3)[1])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_restricted_unpickler_refuses_anything_but_arrays_and_containers(tmp_path, monkeypatch, vectors):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "wikipedia_passages_0.pkl"
    evil.write_bytes(pickle.dumps([("1", vectors[0]), ("2", _Evil())]))
    with pytest.raises(LatentRagError, match=r"asks for (posix|os|nt)\.system; refused"):
        load_dpr_shard(evil)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    from collections import OrderedDict

    evil.write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(LatentRagError, match="collections.OrderedDict; refused"):
        load_dpr_shard(evil)
    evil.write_bytes(pickle.dumps([("1", np.array(["a"], dtype=object))]))
    with pytest.raises(LatentRagError, match="numeric numpy vector"):
        load_dpr_shard(evil)
    evil.write_bytes(b"\x80\x04garbage")
    with pytest.raises(LatentRagError, match="not a readable DPR embeddings pickle"):
        load_dpr_shard(evil)
    # numpy 1.x pickles (numpy.core.*) and protocol 2 (bytes via _codecs.encode) are admitted
    for protocol in (2, 4, 5):
        evil.write_bytes(pickle.dumps([("7", vectors[0]), (8, vectors[1])], protocol=protocol))
        ids, got = load_dpr_shard(evil)
        assert ids == ["7", "8"] and np.array_equal(got, vectors[:2])
    legacy = pickle.dumps([("7", vectors[0])], protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    evil.write_bytes(legacy)
    assert load_dpr_shard(evil)[0] == ["7"]


def test_id_mismatches_are_named(tmp_path, vectors):
    ps = _passages()
    ids = [p.id for p in ps]
    tsv = write_tsv(tmp_path / "psgs.tsv", ps)
    identity = {"name": "x", "sha256": "y"}
    out = tmp_path / "idx"

    extra = write_shards(tmp_path / "a", ids[:29] + ["9999"], vectors, [list(range(30))])
    with pytest.raises(LatentRagError, match=r"ids with vectors but no passage.*'9999'"):
        import_dpr_embeddings(extra, tsv, out, identity)
    missing = write_shards(tmp_path / "b", ids, vectors, [list(range(28))])
    with pytest.raises(LatentRagError, match=r"passages in .* with no vector in the shards: '118', '119'"):
        import_dpr_embeddings(missing, tsv, out, identity)
    twice = write_shards(tmp_path / "c", ids, vectors, [list(range(20)), list(range(18, 30))])
    with pytest.raises(LatentRagError, match=r"vectors in two shards: '108', '109'"):
        import_dpr_embeddings(twice, tsv, out, identity)
    with pytest.raises(LatentRagError, match="no DPR embeddings shards match"):
        import_dpr_embeddings(str(tmp_path / "none_*.pkl"), tsv, out, identity)
    # nothing half-written looks like an index; errors found after the passages were written keep that work
    # for --resume (issue 20), and the message says so
    assert not out.exists() and (tmp_path / ".idx.import" / "state.json").exists()
    with pytest.raises(LatentRagError, match=r"work so far is kept in .*\.idx\.import"):
        import_dpr_embeddings(twice, tsv, out, identity)


def test_interrupted_import_resumes_without_rereading_placed_shards(dpr_files, reference, ctx, tmp_path, monkeypatch):
    import latentrag.retrieval.index.importers as importers

    tsv, pattern = dpr_files
    real = importers.load_dpr_shard
    calls: list[str] = []

    def dying(path):
        calls.append(os.path.basename(path))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while reading the second shard
        return real(path)

    monkeypatch.setattr(importers, "load_dpr_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        import_dpr_embeddings(pattern, tsv, tmp_path / "idx", ctx[0].identity(), chunk_size=4)
    assert not (tmp_path / "idx").exists() and (tmp_path / ".idx.import").is_dir()

    calls.clear()
    monkeypatch.setattr(importers, "load_dpr_shard", lambda p: (calls.append(os.path.basename(p)), real(p))[1])
    index = import_dpr_embeddings(pattern, tsv, tmp_path / "idx", ctx[0].identity(), chunk_size=4, resume=True)
    assert calls == ["wikipedia_passages_1.pkl", "wikipedia_passages_2.pkl"]
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))

    calls.clear()
    monkeypatch.setattr(importers, "load_dpr_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        import_dpr_embeddings(pattern, tsv, tmp_path / "idx2", ctx[0].identity(), chunk_size=4)
    with pytest.raises(LatentRagError, match="cannot resume"):  # other settings: refuse, do not mix
        import_dpr_embeddings(pattern, tsv, tmp_path / "idx2", ctx[0].identity(), chunk_size=5, resume=True)


def _hf_table(passages, vectors, fixed: bool = False) -> pa.Table:
    emb_type = pa.list_(pa.float32(), vectors.shape[1]) if fixed else pa.list_(pa.float32())
    return pa.table({
        "id": pa.array([p.id for p in passages], pa.string()),
        "text": pa.array([p.text for p in passages], pa.string()),
        "title": pa.array([p.title for p in passages], pa.string()),
        "embeddings": pa.array([v.tolist() for v in vectors], emb_type),
    })


def save_to_disk(folder, table: pa.Table, shards: int = 2, batch_rows: int = 6):
    """The layout `Dataset.save_to_disk` writes: Arrow stream files, state.json naming them, dataset_info.json."""
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    names = []
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.slice(bounds[s], bounds[s + 1] - bounds[s]).to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x", "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_hf_dataset_import_equals_building(tmp_path, vectors, reference, ctx):
    folder = save_to_disk(tmp_path / "wiki_dpr", _hf_table(_passages(), vectors))
    index = import_hf_dataset(folder, tmp_path / "idx", ctx[0].identity(), chunk_size=7)
    assert index.passages(np.arange(30)[None])[0] == reference.passages(np.arange(30)[None])[0]
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))

    # a single Arrow IPC *file* with a fixed-size list column and no id column: ids are row numbers
    table = _hf_table(_passages(), vectors, fixed=True).drop_columns(["id"])
    single = tmp_path / "one.arrow"
    with pa.OSFile(str(single), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    index = import_hf_dataset(single, tmp_path / "idx2", ctx[0].identity(), "hnsw")
    assert index.passages(np.array([[0, 29]]))[0][1].id == "29"
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))


def test_hf_dataset_bad_input(tmp_path, vectors):
    no_emb = save_to_disk(tmp_path / "a", _hf_table(_passages(), vectors).drop_columns(["embeddings"]))
    with pytest.raises(LatentRagError, match=r"no column \['embeddings'\]"):
        import_hf_dataset(no_emb, tmp_path / "idx", {"name": "x", "sha256": "y"})
    wrong_dim = save_to_disk(tmp_path / "b", _hf_table(_passages(), vectors), shards=1)
    with pytest.raises(LatentRagError, match="dimension 32, but document encoder 'x' produces 768"):
        import_hf_dataset(wrong_dim, tmp_path / "idx", {"name": "x", "sha256": "y", "dim": 768})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(LatentRagError, match="several splits"):
        import_hf_dataset(tmp_path / "c", tmp_path / "idx", {"name": "x", "sha256": "y"})
    # no index; the passages written before the dimension was found are kept for --resume (issue 20)
    assert not (tmp_path / "idx").exists() and (tmp_path / ".idx.import" / "state.json").exists()


def test_cli_import(dpr_files, ctx, tmp_path, capsys):
    from latentrag.cli import main

    tsv, pattern = dpr_files
    out = tmp_path / "idx"
    assert main(["--threads", "1", "index", "import", "--dpr-embeddings", pattern, "--passages", str(tsv),
                 "--out", str(out), "--encoder-name", str(ctx[1]), "--index-type", "hnsw", "--quiet"]) == 0
    index = DenseIndex.load(out)
    assert index.manifest.encoder["sha256"] == ctx[0].identity()["sha256"] and len(index) == 30
    assert main(["index", "import", "--hf-dataset", str(tmp_path), "--dpr-embeddings", pattern, "--out", str(out),
                 "--encoder-name", "x"]) == 2
    assert "either --dpr-embeddings" in capsys.readouterr().err


def test_interrupted_hf_import_resumes_from_saved_chunks(tmp_path, vectors, reference, monkeypatch):
    import latentrag.retrieval.index.importers as importers

    folder = save_to_disk(tmp_path / "wiki_dpr", _hf_table(_passages(), vectors))
    real = importers._save_npy
    saved: list[str] = []

    def dying(path, array):
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed after two chunks
        saved.append(path.name)
        real(path, array)

    monkeypatch.setattr(importers, "_save_npy", dying)
    with pytest.raises(KeyboardInterrupt):
        import_hf_dataset(folder, tmp_path / "idx", {"name": "x", "sha256": "y"}, chunk_size=8)
    assert saved == ["chunk-000000.npy", "chunk-000001.npy"]
    saved.clear()
    monkeypatch.setattr(importers, "_save_npy", lambda path, array: (saved.append(path.name), real(path, array)))
    index = import_hf_dataset(folder, tmp_path / "idx", {"name": "x", "sha256": "y"}, chunk_size=8, resume=True)
    assert saved == ["chunk-000002.npy", "chunk-000003.npy"]  # the first two were kept
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))


def test_a_named_folder_that_does_not_load_is_an_error(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(LatentRagError, match="cannot load encoder"):
        document_encoder_identity(str(tmp_path / "broken"))
    named = document_encoder_identity("owner/not-here", 768, load=False)
    assert named["sha256"] == "unverified-name:owner/not-here" and named["verified"] is False


def test_import_index_checks_up_front_and_records_a_name(dpr_files, tmp_path, capsys):
    from latentrag.cli import main
    from latentrag.retrieval.index.importers import import_index

    tsv, pattern = dpr_files
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LatentRagError, match="is a file"):
        import_index(a_file, "x", dpr_embeddings=pattern, passages=tsv)
    with pytest.raises(LatentRagError, match="unknown index type"):
        import_index(tmp_path / "idx", "x", dpr_embeddings=pattern, passages=tsv, index_type="lsh")
    with pytest.raises(LatentRagError, match="needs --passages"):
        import_index(tmp_path / "idx", "x", dpr_embeddings=pattern)
    assert main(["--threads", "1", "index", "import", "--dpr-embeddings", pattern, "--passages", str(tsv), "--out",
                 str(tmp_path / "idx"), "--encoder-name", "facebook/dpr-ctx_encoder-single-nq-base",
                 "--no-load-encoder", "--quiet"]) == 0
    assert "recorded by name only" in capsys.readouterr().err
    encoder = DenseIndex.load(tmp_path / "idx").manifest.encoder
    assert encoder["sha256"] == "unverified-name:facebook/dpr-ctx_encoder-single-nq-base"
    assert encoder["dim"] == 32 and encoder["verified"] is False  # the vectors' dimension


def test_vectors_of_another_dimension_than_the_named_encoder_are_refused_at_import(dpr_files, tmp_path):
    """Issue 20: `--no-load-encoder` naming `minilm` (384) for 32-dim vectors made an index refused only later."""
    from latentrag.retrieval.index.importers import import_index

    tsv, pattern = dpr_files
    with pytest.raises(LatentRagError, match="dimension 32, but document encoder 'minilm' produces 384"):
        import_index(tmp_path / "idx", "minilm", dpr_embeddings=pattern, passages=tsv, load_encoder=False,
                     progress=False)
    assert not (tmp_path / "idx").exists()
    # the passages were written: the work is kept, and naming the right encoder resumes it
    index = import_index(tmp_path / "idx", "some/dpr-ctx", dpr_embeddings=pattern, passages=tsv, load_encoder=False,
                         resume=True, progress=False)
    assert index.manifest.encoder["dim"] == 32 and len(index) == 30


def test_a_late_error_keeps_the_resumable_work(dpr_files, reference, ctx, tmp_path, monkeypatch):
    """A bad second shard (after the passages and the first shard are placed) keeps the work; once the shard is
    given again, --resume places only what is missing."""
    import latentrag.retrieval.index.importers as importers

    tsv, pattern = dpr_files
    real = importers.load_dpr_shard
    calls: list[str] = []

    def corrupt_second(path):
        calls.append(os.path.basename(path))
        if len(calls) == 2:
            raise LatentRagError(f"{path}: not a DPR embeddings shard (truncated pickle)")
        return real(path)

    monkeypatch.setattr(importers, "load_dpr_shard", corrupt_second)
    with pytest.raises(LatentRagError, match="work so far is kept") as info:
        import_dpr_embeddings(pattern, tsv, tmp_path / "idx", ctx[0].identity(), chunk_size=4)
    assert "--resume" in str(info.value)
    assert (tmp_path / ".idx.import" / "shard-00000.rows.npy").exists() and not (tmp_path / "idx").exists()
    second = Path(sorted(glob.glob(pattern))[1])
    os.utime(second, ns=(second.stat().st_atime_ns, second.stat().st_mtime_ns + 10**9))  # "downloaded again"
    calls.clear()
    monkeypatch.setattr(importers, "load_dpr_shard", lambda p: (calls.append(os.path.basename(p)), real(p))[1])
    index = import_dpr_embeddings(pattern, tsv, tmp_path / "idx", ctx[0].identity(), chunk_size=4, resume=True)
    assert calls == ["wikipedia_passages_1.pkl", "wikipedia_passages_2.pkl"]  # not the placed first shard
    np.testing.assert_array_equal(index.reconstruct(np.arange(30)[None]), reference.reconstruct(np.arange(30)[None]))
