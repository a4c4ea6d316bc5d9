"""Distributed encoding on a local Ray cluster: `build_sharded_index` equals the single-process build and
resumes an interrupted run without re-encoding the blocks it saved."""

import numpy as np
import pytest
from tiny_models import CORPUS, tiny_dense_encoder

from latentrag.distributed import encoding
from latentrag.distributed.encoding import build_sharded_index
from latentrag.distributed.sharded import ShardedIndex, read_sharded
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.index import DenseIndex, build_index

pytest.importorskip("ray")

CHUNK = 16


def _passages(n: int = 90) -> list[Passage]:
    """n passages of varied length drawn (seeded) from the tiny corpus's sentences."""
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS).split()
    out = []
    for i in range(n):
        start, length = rng.integers(0, len(words) - 30), rng.integers(3, 30)
        out.append(Passage(f"doc{i}", f"title {i % 7}", " ".join(words[start : start + length])))
    return out


@pytest.fixture(scope="module")
def encoder():
    return tiny_dense_encoder("dpr-context")


@pytest.fixture(scope="module")
def single(encoder, tmp_path_factory):
    return build_index(_passages(), encoder, tmp_path_factory.mktemp("single") / "index", batch_size=8,
                       progress=False, chunk_size=CHUNK)


def _shard_union(directory):
    """(passages, vectors) of a sharded folder read back shard by shard, in global row order."""
    _, shards = read_sharded(directory)
    passages, vectors = [], []
    for spec in shards:
        index = DenseIndex.load(directory / spec.directory)
        passages += list(index.store)
        vectors.append(index.reconstruct(np.arange(len(index))[None])[0])
    return passages, np.concatenate(vectors)


def test_ray_build_equals_the_single_process_build(ray_cluster, encoder, single, tmp_path):
    report = build_sharded_index(_passages(), encoder, tmp_path / "sharded", shards=3, batch_size=8,
                                 progress=False, workers=2, num_cpus=0.25, chunk_size=CHUNK)
    assert (report.passages, report.shards, report.encoded_blocks, report.reused_blocks) == (90, 3, 6, 0)
    manifest, shards = read_sharded(tmp_path / "sharded")
    assert [s.count for s in shards] == [30, 30, 30]
    assert manifest.encoder == single.manifest.encoder and manifest.count == len(single)
    passages, vectors = _shard_union(tmp_path / "sharded")
    assert passages == list(single.store)
    want = single.reconstruct(np.arange(len(single))[None])[0]
    np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / ".sharded.ray-build").exists()  # the work folder is gone
    sharded = ShardedIndex(tmp_path / "sharded", num_cpus=0.25)
    try:
        queries = encoder.embed(["Who wrote Hamlet?", "capital of France"]).detach().numpy()
        np.testing.assert_array_equal(sharded.search(queries, 7)[1], single.search(queries, 7)[1])
    finally:
        sharded.close()


def test_interrupted_build_resumes_without_reencoding_saved_blocks(ray_cluster, encoder, single, tmp_path,
                                                                   monkeypatch):
    target = tmp_path / "sharded"
    work = tmp_path / ".sharded.ray-build"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the build dies after encoding, before the shards are written

    with monkeypatch.context() as m:
        m.setattr(encoding, "assemble_shards", killed)
        with pytest.raises(KeyboardInterrupt):
            build_sharded_index(_passages(), encoder, target, shards=2, batch_size=8, progress=False,
                                workers=1, num_cpus=0.25, chunk_size=CHUNK)
    assert not target.exists()  # nothing loadable was left at the target
    blocks = sorted(work.glob("chunk-*.npy"))
    assert len(blocks) == 6
    for lost in (blocks[1], blocks[4]):  # as if the kill had come before these two were saved
        lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in blocks if p.exists()}
    with pytest.raises(LatentRagError, match="cannot resume: the interrupted build .* used other settings"):
        build_sharded_index(_passages(), encoder, target, shards=3, batch_size=8, progress=False, resume=True,
                            workers=1, num_cpus=0.25, chunk_size=CHUNK)
    with pytest.raises(LatentRagError, match="cannot resume: the corpus differs"):
        build_sharded_index(_passages(89), encoder, target, shards=2, batch_size=8, progress=False, resume=True,
                            workers=1, num_cpus=0.25, chunk_size=CHUNK)
    report = build_sharded_index(_passages(), encoder, target, shards=2, batch_size=8, progress=False,
                                 resume=True, workers=1, num_cpus=0.25, chunk_size=CHUNK)
    assert (report.encoded_blocks, report.reused_blocks) == (2, 4)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p.exists()) or not work.exists()
    passages, vectors = _shard_union(target)
    assert passages == list(single.store)
    np.testing.assert_allclose(vectors, single.reconstruct(np.arange(len(single))[None])[0], rtol=1e-5, atol=1e-5)


def test_bad_requests_fail_before_encoding(ray_cluster, encoder, tmp_path):
    with pytest.raises(LatentRagError, match="--shards must be between 1 and the number of passages"):
        build_sharded_index(_passages(4), encoder, tmp_path / "x", shards=5, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.ray-build").exists()
    with pytest.raises(LatentRagError, match="no passages"):
        build_sharded_index([], encoder, tmp_path / "y", shards=1, progress=False)


def test_cli_build_info_and_ask_with_ray(ray_cluster, tmp_path, monkeypatch, capsys):
    """`index build --ray --shards 2`, `index info` and `ask --ray` through the command line's own code."""
    import json

    from tiny_models import tiny_decoder_only_generator

    from latentrag import cli
    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.encoders import DenseEncoder
    from latentrag.retrieval.retriever import Retriever

    tiny_dense_encoder("dpr-context", seed=2).save_pretrained(tmp_path / "tower")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n"
                              for p in _passages(40)))
    out = tmp_path / "sharded"
    assert cli.main(["--threads", "1", "index", "build", "--corpus", str(corpus), "--out", str(out), "--encoder",
                     str(tmp_path / "tower"), "--ray", "--shards", "2", "--workers", "1", "--cpus-per-worker",
                     "0.25", "--quiet"]) == 0
    assert cli.main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 40 and [s["count"] for s in info["shards"]] == [20, 20]

    document = DenseEncoder.from_pretrained(tmp_path / "tower")
    from latentrag.retrieval.corpus import read_corpus, split_passages

    single = build_index(split_passages(read_corpus(corpus)), document, tmp_path / "single", progress=False)
    from latentrag.loading import open_index

    with pytest.raises(LatentRagError, match="is a sharded index: add --ray"):
        open_index(out)

    def tiny_model(config=None, index=None):
        retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), document.identity())
        return RagModel(retriever, tiny_decoder_only_generator(seed=0), RagConfig(k=3, max_new_tokens=4))

    monkeypatch.setattr(RagModel, "from_components", staticmethod(tiny_model))  # what --model base builds
    assert cli.main(["--threads", "1", "ask", "Who wrote Hamlet?", "--k", "3", "--decoding", "greedy", "--json",
                     "--index", str(out), "--ray", "--model", "base"]) == 0
    remote = json.loads(capsys.readouterr().out)
    local_model = tiny_model()
    local_model.retriever.swap_index(single)
    local = local_model.generate(["Who wrote Hamlet?"], k=3, decoding="greedy")[0].to_json()
    assert [p["id"] for p in remote["passages"]] == [p["id"] for p in local["passages"]]
    assert remote["answer"] == local["answer"] and remote["tokens"] == local["tokens"]
    assert [p["probability"] for p in remote["passages"]] == pytest.approx(
        [p["probability"] for p in local["passages"]], abs=1e-5)
