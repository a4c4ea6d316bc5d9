"""The retriever p_η(z|x): questions -> top-k passages, their stored vectors, and differentiable scores.

faiss finds the top-k ids (non-differentiable MIPS); the scores d(z)ᵀq(x) are then recomputed in torch
from the stored document vectors, so the loss's gradient reaches the query tower (paper §2.4) while
the document tower and the index stay fixed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from latentrag.errors import LatentRagError
from latentrag.marginals import retrieval_log_prior
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.encoders import DenseEncoder
from latentrag.retrieval.index import DenseIndex


@dataclass
class RetrievedBatch:
    """B questions with their k passages each. Shapes: ids (B,k), doc_vectors (B,k,d), scores (B,k)."""

    questions: list[str]
    ids: np.ndarray
    passages: list[list[Passage]]
    doc_vectors: Tensor
    scores: Tensor

    @property
    def log_prior(self) -> Tensor:
        """log p_η(z|x) over the top-k (eq. 1)."""
        return retrieval_log_prior(self.scores)

    @property
    def k(self) -> int:
        return self.ids.shape[1]


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
    """Query tower + a swappable index built by a known document tower."""

    def __init__(self, query_encoder: DenseEncoder, document_encoder: dict, index: DenseIndex | None = None):
        super().__init__()
        self.query_encoder = query_encoder
        self.document_encoder = document_encoder  # identity of the tower that must have built the index
        self._index: DenseIndex | None = None
        self._lock = threading.Lock()
        if index is not None:
            self.swap_index(index)

    @property
    def index(self) -> DenseIndex:
        if self._index is None:
            raise LatentRagError("no index loaded: build one with `latentrag index build` and load it")
        return self._index

    def check_index(self, index: DenseIndex) -> None:
        """Refuse an index whose vectors live in another space than this query tower's."""
        built_by = index.manifest.encoder
        if index.dim != self.query_encoder.dim:
            raise LatentRagError(
                f"index {index.directory} has dimension {index.dim}, the query tower produces {self.query_encoder.dim}"
            )
        if built_by.get("sha256") != self.document_encoder.get("sha256"):
            raise LatentRagError(
                f"index {index.directory} was built by document encoder '{built_by.get('name')}' "
                f"(sha256 {str(built_by.get('sha256'))[:12]}…), but this model's query tower pairs with "
                f"'{self.document_encoder.get('name')}' (sha256 {str(self.document_encoder.get('sha256'))[:12]}…): "
                "rebuild the index with the model's document encoder"
            )

    def swap_index(self, index: DenseIndex) -> None:
        """Replace the index for later calls; calls in flight keep the one they started with."""
        self.check_index(index)
        with self._lock:
            self._index = index

    def retrieve(self, questions: list[str], k: int) -> RetrievedBatch:
        """Top-k passages for each question, with scores d(z)ᵀq(x) that carry gradients to the query tower."""
        questions = check_questions(questions)
        index = self.index  # one reference for the whole call: a concurrent swap does not affect it
        if not 1 <= k <= len(index):
            raise LatentRagError(f"k must be between 1 and the index size {len(index)}, got {k}")
        q = self.query_encoder.embed(questions)  # (B,d)
        _, ids = index.search(q.detach().float().cpu().numpy(), k)
        if (ids < 0).any():
            raise LatentRagError(f"the index returned fewer than k={k} passages; lower k or widen the search")
        doc_vectors = torch.from_numpy(index.reconstruct(ids)).to(q.device, q.dtype)  # (B,k,d)
        scores = torch.einsum("bd,bkd->bk", q, doc_vectors)
        return RetrievedBatch(questions, ids, index.passages(ids), doc_vectors, scores)
