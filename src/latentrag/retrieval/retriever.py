"""The retriever p_η(z|x): questions -> top-k passages, their stored vectors, and differentiable scores.

A searcher (`latentrag.retrieval.searcher.Searcher`; the local one is `DenseIndex`) finds the top-k ids
and returns their stored vectors (non-differentiable MIPS); the scores s·d(z)ᵀq(x) are then recomputed in
torch from those vectors, so the loss's gradient reaches the query tower (paper §2.4) while the document
tower and the index stay fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from latentrag.errors import LatentRagError
from latentrag.marginals import retrieval_log_prior
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.encoders import DenseEncoder
from latentrag.retrieval.searcher import Searcher


@dataclass
class RetrievedBatch:
    """B questions with their k passages each. Shapes: ids (B,k), doc_vectors (B,k,d), scores (B,k);
    query_vectors (B,d), with their gradients, when a `Retriever` made the batch (`Retriever.rescore` needs them)."""

    questions: list[str]
    ids: np.ndarray
    passages: list[list[Passage]]
    doc_vectors: Tensor
    scores: Tensor
    query_vectors: Tensor | None = None

    @property
    def log_prior(self) -> Tensor:
        """log p_η(z|x) over the top-k (eq. 1)."""
        return retrieval_log_prior(self.scores)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def top(self, k: int) -> RetrievedBatch:
        """The first k passages of each question (retrieve once, deep, and use a prefix: e.g. recall@20 and
        a k=5 answer from one search). p(z|x) is renormalised over the k kept, as a k-deep retrieval would."""
        if not 1 <= k <= self.k:
            raise LatentRagError(f"k must be between 1 and the {self.k} passages retrieved, got {k}")
        if k == self.k:
            return self
        return RetrievedBatch(self.questions, self.ids[:, :k], [row[:k] for row in self.passages],
                              self.doc_vectors[:, :k], self.scores[:, :k], self.query_vectors)

    def pick(self, rows: list[list[int]]) -> RetrievedBatch:
        """Each question's passages at the given ranks (one list of equal length per question), p(z|x)
        renormalised over those kept; the scores keep their gradients."""
        index = np.asarray(rows, dtype=np.int64)
        if index.ndim != 2 or index.shape[0] != len(self.questions) or index.size and not (
                index.min() >= 0 and index.max() < self.k):
            raise LatentRagError(f"pick needs one list of ranks below {self.k} per question, got {rows!r}")
        at = torch.from_numpy(index).to(self.scores.device)
        return RetrievedBatch(self.questions, np.take_along_axis(self.ids, index, axis=1),
                              [[row[i] for i in ranks] for row, ranks in zip(self.passages, rows, strict=True)],
                              self.doc_vectors[torch.arange(len(rows), device=at.device)[:, None], at],
                              self.scores.gather(1, at), self.query_vectors)


def check_questions(questions: list[str]) -> list[str]:
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise LatentRagError("no questions given")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise LatentRagError(f"question {i} is empty: give some text to retrieve for")
    return list(questions)


class Retriever(nn.Module):
    """Query tower + a swappable searcher whose vectors a known document tower built + the scale s of eq. (1).

    scores = s · d(z)ᵀq(x) with s = exp(log_scale): s = 1 is the paper's form (right for un-normalised
    towers such as DPR); unit-vector towers give inner products in a narrow band and need s > 1 for p(z|x)
    to be more than uniform. `log_scale` is a scalar parameter, trained only when `learn_scale`.

    Picklable and deep-copyable (no locks): the searcher is one attribute, rebound atomically by
    `swap_index`, and each `retrieve` reads it once.
    """

    def __init__(self, query_encoder: DenseEncoder, document_encoder: dict, index: Searcher | None = None,
                 scale: float = 1.0, learn_scale: bool = False):
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise LatentRagError(f"the retrieval scale must be a positive number, got {scale!r}")
        self.query_encoder = query_encoder
        self.document_encoder = document_encoder  # identity of the tower that must have built the index
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32),
                                      requires_grad=learn_scale)
        self._index: Searcher | None = None
        if index is not None:
            self.swap_index(index)

    @property
    def scale(self) -> float:
        """s in p(z|x) ∝ exp(s · d(z)ᵀq(x)), as a Python float (what a saved config records)."""
        return math.exp(float(self.log_scale.detach().double()))

    @property
    def index(self) -> Searcher:
        if self._index is None:
            raise LatentRagError("no index loaded: build one with `latentrag index build` and load it")
        return self._index

    def check_index(self, index: Searcher) -> None:
        """Refuse an index whose vectors live in another space than this query tower's."""
        if not isinstance(index, Searcher):
            raise LatentRagError(
                f"{type(index).__name__} is not a searcher: it needs manifest.encoder, dim, len(), "
                "search_with_vectors(queries, k) and passages(ids) (see latentrag.retrieval.searcher)"
            )
        built_by = index.manifest.encoder
        where = getattr(index, "directory", type(index).__name__)
        if index.dim != self.query_encoder.dim:
            raise LatentRagError(
                f"index {where} has dimension {index.dim}, the query tower produces {self.query_encoder.dim}"
            )
        if built_by.get("sha256") != self.document_encoder.get("sha256"):
            raise LatentRagError(
                f"index {where} was built by document encoder '{built_by.get('name')}' "
                f"(sha256 {str(built_by.get('sha256'))[:12]}…), but this model's query tower pairs with "
                f"'{self.document_encoder.get('name')}' (sha256 {str(self.document_encoder.get('sha256'))[:12]}…): "
                "rebuild the index with the model's document encoder"
            )

    def swap_index(self, index: Searcher) -> None:
        """Replace the index for later calls; calls in flight keep the one they started with (the swap is
        one attribute rebind, atomic under the GIL, and `retrieve` reads the attribute once)."""
        self.check_index(index)
        self._index = index

    def retrieve(self, questions: list[str], k: int) -> RetrievedBatch:
        """Top-k passages for each question, with scores s·d(z)ᵀq(x) that carry gradients to the query tower
        (and to the scale, when it is learned)."""
        questions = check_questions(questions)
        index = self.index  # one reference for the whole call: a concurrent swap does not affect it
        if not 1 <= k <= len(index):
            raise LatentRagError(f"k must be between 1 and the index size {len(index)}, got {k}")
        q = self.query_encoder.embed(questions)  # (B,d)
        _, ids, vectors = index.search_with_vectors(q.detach().float().cpu().numpy(), k)
        ids = np.asarray(ids)
        if ids.shape != (len(questions), k):
            raise LatentRagError(f"the searcher returned ids of shape {ids.shape}, expected {(len(questions), k)}")
        if (ids < 0).any():
            raise LatentRagError(f"the index returned fewer than k={k} passages; lower k or widen the search")
        vectors = np.require(vectors, np.float32, ["C", "W"])  # a writable copy only when needed
        doc_vectors = torch.from_numpy(vectors).to(q.device, torch.float32)  # (B,k,d), constants
        return RetrievedBatch(questions, ids, index.passages(ids), doc_vectors, self._scores(q, doc_vectors), q)

    def _scores(self, q: Tensor, doc_vectors: Tensor) -> Tensor:
        """s · d(z)ᵀq(x), (B,d) x (B,k,d) -> (B,k), in fp32 even under bf16 autocast: the softmax needs it."""
        with torch.autocast(q.device.type, enabled=False):
            return self.log_scale.float().exp() * torch.einsum("bd,bkd->bk", q.float(), doc_vectors.float())

    def rescore(self, retrieved: RetrievedBatch, passages: list[list[Passage]], doc_vectors: Tensor) -> RetrievedBatch:
        """The same questions reading other passages (same shape): their document vectors scored against the
        batch's query vectors, gradients kept — what an index holding those passages would give, without a
        new search (training's counterfactual passages, re-encoded by the frozen document tower)."""
        if retrieved.query_vectors is None:
            raise LatentRagError("rescore needs the query vectors of a batch this retriever retrieved")
        if doc_vectors.shape != retrieved.doc_vectors.shape or len(passages) != len(retrieved.questions):
            raise LatentRagError(f"rescore needs passages and vectors shaped like the batch's "
                                 f"{tuple(retrieved.doc_vectors.shape)}, got {tuple(doc_vectors.shape)}")
        doc_vectors = doc_vectors.to(retrieved.query_vectors.device, torch.float32)
        return RetrievedBatch(retrieved.questions, retrieved.ids, passages, doc_vectors,
                              self._scores(retrieved.query_vectors, doc_vectors), retrieved.query_vectors)
