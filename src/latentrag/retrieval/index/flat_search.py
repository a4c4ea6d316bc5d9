"""Exact flat search as blocked matrix products and a grouped top-k, equal to faiss's `IndexFlatIP` to the bit."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch

SCORE_BLOCK = 1 << 23  # scores (float32, 32 MB) per matrix product: reduced while they are still in cache
MAXIMA_BLOCK = 1 << 22  # group maxima (16 MB) kept before choosing candidate groups among them
QUERY_BLOCK = 256  # queries per matrix product, so a passage block still spans >= 32,768 passages
RESCORE_AT = 4096  # candidates per query gathered before faiss re-scores them down to k
TOPK_GROUP = 16  # scores per group in the grouped top-k


def flat_matrix(index: faiss.Index) -> torch.Tensor | None:
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
    # (B, G): maximum of columns j, j + G, ..., j + (group-1)·G; numpy on this thread (see `gemm_topk`)
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
def gemm_topk(matrix: torch.Tensor, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
