"""Exact flat search (blocked GEMM + grouped top-k) against faiss IndexFlatIP, across block boundaries."""

import faiss
import numpy as np
import pytest
import torch

import latentrag.retrieval.index.flat_search as li

N, D = 5003, 24  # 5003 = 5·1000 + 3: a last passage block narrower than k


def _faiss(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)


def _blocks(monkeypatch, blocks):
    for name, value in zip(("SCORE_BLOCK", "MAXIMA_BLOCK", "QUERY_BLOCK", "RESCORE_AT"), blocks, strict=False):
        monkeypatch.setattr(li, name, value)


# (SCORE_BLOCK, MAXIMA_BLOCK, QUERY_BLOCK[, RESCORE_AT]): the defaults (one block); 1,000-passage blocks of
# 62 groups over 8-query blocks (37 queries: a last block of 5), the maxima of all five reduced together, or
# two at a time (2, 2, 1) with a 3-passage last block, re-scoring the candidates at every step or not; blocks
# of 997 // 8 rows, raised to 4·k groups (a narrower last block takes `_topk_grouped`), also for one query
BLOCKS = [(1 << 23, 1 << 22, 256), (8_000, 1 << 22, 8), (8_000, 8 * 62 * 2, 8), (8_000, 8 * 62 * 2, 8, 1),
          (997, 1 << 22, 8), (997, 1 << 22, 1)]


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("k", [1, 10, 50])
def test_blocked_search_matches_faiss(monkeypatch, blocks, k):
    _blocks(monkeypatch, blocks)
    rng = np.random.default_rng(k)
    x = rng.standard_normal((N, D), dtype=np.float32)
    q = rng.standard_normal((37, D), dtype=np.float32)
    scores, ids = li.gemm_topk(torch.from_numpy(x), q, k)
    ref_scores, ref_ids = _faiss(x, q, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)  # re-scored by faiss's own kernel: bit for bit
    one_scores, one_ids = li.gemm_topk(torch.from_numpy(x), q[:1], k)  # a single query
    np.testing.assert_array_equal(one_ids, ref_ids[:1])
    np.testing.assert_array_equal(one_scores, ref_scores[:1])


@pytest.mark.parametrize("blocks", BLOCKS[:3])
def test_ties_give_faiss_scores_and_tied_ids_in_any_order(monkeypatch, blocks):
    """Small integer vectors: every score is exact, so many are tied. The scores equal faiss's exactly and
    the ids are a valid top-k: distinct, each with the score returned, every strictly better one included.
    Which of several tied passages fills the last places is unspecified (faiss's choice depends on its
    own scan order, and so does ours on the blocks)."""
    _blocks(monkeypatch, blocks)
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, (N, 16)).astype(np.float32)
    x[4000:4100] = x[:100]  # duplicated passages
    q = rng.integers(-1, 2, (37, 16)).astype(np.float32)
    k = 10
    scores, ids = li.gemm_topk(torch.from_numpy(x), q, k)
    ref_scores, _ = _faiss(x, q, k)
    np.testing.assert_array_equal(scores, ref_scores)
    exact = q @ x.T  # integer sums: exact in float32
    for row in range(len(q)):
        assert len(set(ids[row])) == k
        np.testing.assert_array_equal(exact[row, ids[row]], scores[row])
        better = np.flatnonzero(exact[row] > scores[row, -1])
        assert set(better) <= set(ids[row])


def test_k_equal_to_n_returns_every_passage():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8), dtype=np.float32)
    q = rng.standard_normal((3, 8), dtype=np.float32)
    scores, ids = li.gemm_topk(torch.from_numpy(x), q, 40)
    ref_scores, ref_ids = _faiss(x, q, 40)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17])
def test_fewer_passages_than_a_group(n):
    """Indexes smaller than one top-k group (tiny corpora, unit-test indexes) search like faiss."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 8), dtype=np.float32)
    q = rng.standard_normal((3, 8), dtype=np.float32)
    k = min(3, n)
    scores, ids = li.gemm_topk(torch.from_numpy(x), q, k)
    ref_scores, ref_ids = _faiss(x, q, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
