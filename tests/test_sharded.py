"""Sharded retrieval on a local Ray cluster: the fan-out + merge equals one flat index over the union,
a dead shard actor is restarted and the query retried, and errors name the shard."""

import shutil
import time

import numpy as np
import pytest
import torch
from tiny_models import QUESTIONS, tiny_dense_encoder

from latentrag.distributed.sharded import (
    ShardedIndex,
    build_sharded_from_vectors,
    is_sharded,
    read_sharded,
    shard_bounds,
)
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.index import build_index_from_vectors
from latentrag.retrieval.retriever import Retriever
from latentrag.serving.schemas import AskRequest

ray = pytest.importorskip("ray")

N, D = 600, 32
IDENTITY = {"name": "test-tower", "sha256": "ab" * 32}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Random vectors (no two scores tie) indexed flat in one folder and in three shards."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    passages = [Passage(f"p{i}", f"title {i}", f"text of passage {i}") for i in range(N)]
    root = tmp_path_factory.mktemp("sharded")
    flat = build_index_from_vectors(vectors, passages, root / "flat", IDENTITY)
    build_sharded_from_vectors(vectors, passages, root / "sharded", IDENTITY, shards=3)
    queries = rng.standard_normal((12, D)).astype(np.float32)
    return root, flat, vectors, passages, queries


@pytest.fixture(scope="module")
def sharded(ray_cluster, corpus):
    index = ShardedIndex(corpus[0] / "sharded", num_cpus=0.25)
    yield index
    index.close()


def test_layout_contiguous_shards(corpus):
    manifest, shards = read_sharded(corpus[0] / "sharded")
    assert is_sharded(corpus[0] / "sharded") and not is_sharded(corpus[0] / "flat")
    assert [(s.start, s.count) for s in shards] == [(0, 200), (200, 200), (400, 200)]
    assert manifest.count == N and manifest.dim == D and manifest.encoder == IDENTITY
    assert shard_bounds(7, 3) == [(0, 2), (2, 5), (5, 7)]
    with pytest.raises(LatentRagError, match="--shards must be between 1"):
        shard_bounds(2, 3)
    with pytest.raises(LatentRagError, match="single index, not a sharded one"):
        read_sharded(corpus[0] / "flat")


@pytest.mark.parametrize("k", [1, 5, 37, 250, N])
def test_search_equals_one_flat_index(sharded, corpus, k):
    _, flat, _, _, queries = corpus
    want_scores, want_ids = flat.search(queries, k)
    scores, ids = sharded.search(queries, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)  # same kernel per row: equal to the bit
    s2, i2, vectors = sharded.search_with_vectors(queries, k)
    np.testing.assert_array_equal(i2, want_ids)
    np.testing.assert_array_equal(vectors, flat.reconstruct(want_ids))


def test_reconstruct_and_passages_by_global_id(sharded, corpus):
    _, flat, vectors, passages, _ = corpus
    ids = np.array([[0, 199, 200, 599], [401, 3, 399, 400]])
    np.testing.assert_array_equal(sharded.reconstruct(ids), vectors[ids])
    assert sharded.passages(ids) == [[passages[i] for i in row] for row in ids.tolist()]
    assert len(sharded) == N and sharded.dim == D


def test_bad_input_is_a_clear_error(sharded):
    with pytest.raises(LatentRagError, match="k must be between 1 and the index size 600"):
        sharded.search(np.zeros((1, D), np.float32), N + 1)
    with pytest.raises(LatentRagError, match=r"expects \(\*, 32\)"):
        sharded.search(np.zeros((1, D + 1), np.float32), 3)
    with pytest.raises(LatentRagError, match="out of range"):
        sharded.reconstruct(np.array([[N]]))


def test_retriever_takes_the_sharded_index(sharded, corpus):
    """The Retriever's interface (search, reconstruct, passages, manifest.encoder, dim) is served as is."""
    _, flat, _, _, _ = corpus
    encoder = tiny_dense_encoder("bert")
    local, remote = Retriever(encoder, IDENTITY, flat), Retriever(encoder, IDENTITY, sharded)
    with torch.no_grad():
        a, b = local.retrieve(QUESTIONS, 4), remote.retrieve(QUESTIONS, 4)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.passages == b.passages
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_dead_shard_actor_is_restarted_and_the_query_retried(sharded, corpus):
    _, flat, _, _, queries = corpus
    want = flat.search(queries, 9)
    before = ray.get(sharded._actors[1].pid.remote())
    ray.kill(sharded._actors[1], no_restart=False)  # Ray restarts it (max_restarts) and retries the call
    np.testing.assert_array_equal(sharded.search(queries, 9)[1], want[1])
    assert ray.get(sharded._actors[1].pid.remote()) != before
    ray.kill(sharded._actors[2], no_restart=True)  # Ray will not: the index re-creates it from the folder
    np.testing.assert_array_equal(sharded.search(queries, 9)[1], want[1])


def test_a_shard_that_cannot_come_back_is_named(ray_cluster, corpus, tmp_path):
    shutil.copytree(corpus[0] / "sharded", tmp_path / "copy")
    index = ShardedIndex(tmp_path / "copy", num_cpus=0.25, max_restarts=0)
    try:
        shutil.rmtree(tmp_path / "copy" / "shard-001")
        ray.kill(index._actors[1], no_restart=True)
        with pytest.raises(LatentRagError, match=r"shard 1 \(.*shard-001\) failed .*not a latentrag index"):
            index.search(corpus[4], 3)
    finally:
        index.close()


def test_an_actor_that_cannot_be_placed_is_an_error_not_a_hang(ray_cluster, corpus):
    with pytest.raises(LatentRagError, match=r"did not start within 2 s: each actor asks for 8 CPU"):
        ShardedIndex(corpus[0] / "sharded", num_cpus=8, start_timeout=2)


def test_pickles_for_other_processes_of_the_cluster(sharded, corpus):
    """Training workers and servers receive the searcher by pickling (actor handles travel, not shards)."""
    import pickle

    _, flat, _, _, queries = corpus
    copy = pickle.loads(pickle.dumps(sharded))
    np.testing.assert_array_equal(copy.search(queries, 4)[1], flat.search(queries, 4)[1])

    @ray.remote(num_cpus=0.25)
    def remote_search(index, q):
        return index.search(q, 4)[1]

    np.testing.assert_array_equal(ray.get(remote_search.remote(sharded, queries)), flat.search(queries, 4)[1])


def test_serve_opens_a_sharded_index_with_ray(ray_cluster, corpus):
    """`latentrag serve --ray`: the service opens the index under its root as a Ray fan-out (any Searcher), and
    answers as it does over the same passages in one flat index."""
    from tiny_models import tiny_decoder_only_generator

    from latentrag.distributed.sharded import ShardedIndex
    from latentrag.model import RagConfig, RagModel
    from latentrag.serving.loader import load_service

    root = corpus[0]
    model = RagModel(Retriever(tiny_dense_encoder("bert"), IDENTITY), tiny_decoder_only_generator(seed=0),
                     RagConfig(k=3, max_new_tokens=3))
    with pytest.raises(LatentRagError, match="sharded index: add --ray"):
        load_service(index="sharded", indexes_root=root, model=model)
    service = load_service(index="sharded", indexes_root=root, model=model, ray=True)
    try:
        assert isinstance(service.active.index, ShardedIndex)
        settings = service.settings(AskRequest(question=QUESTIONS[0]))
        served, active, _ = service.answer_batch(QUESTIONS[:2], settings)
        assert active.name == "sharded"
        model.swap_index(corpus[1])
        alone = model.generate(QUESTIONS[:2], k=3, max_new_tokens=3)
        assert [a.text for a in served] == [a.text for a in alone]
        assert [[p.id for p in a.passages] for a in served] == [[p.id for p in a.passages] for a in alone]
    finally:
        service.active.index.close()


def test_a_failed_size_check_releases_the_actors(ray_cluster, corpus, tmp_path, monkeypatch):
    """Issue 20: the actors started before a shard failed its size check were left running."""
    root, _, vectors, passages, _ = corpus
    shutil.copytree(root / "sharded", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "shard-001")
    build_index_from_vectors(vectors[200:350], passages[200:350], tmp_path / "copy" / "shard-001", IDENTITY)
    closed = []
    close = ShardedIndex.close
    monkeypatch.setattr(ShardedIndex, "close", lambda self: (closed.append(list(self._actors)), close(self))[1])
    with pytest.raises(LatentRagError, match=r"shard 1 .* holds 150 passages, the manifest says 200"):
        ShardedIndex(tmp_path / "copy", num_cpus=0.25, max_restarts=0)
    assert len(closed) == 1 and len(closed[0]) == 3  # every actor started was killed
    for actor in closed[0]:  # ray.kill is asynchronous: a call may still be served until the kill lands
        deadline = time.monotonic() + 30
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray.get(actor.size.remote(), timeout=30)
                time.sleep(0.2)
