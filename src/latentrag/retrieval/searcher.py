"""The Searcher protocol: what the retriever needs from an index, arrays in and arrays out.

The retriever p_η(z|x) encodes questions with its query tower and hands the vectors to a searcher, which
returns the top-k ids, their inner products and the stored document vectors d(z) in one call (as Hugging
Face's `Index.get_top_docs` and DPR's `DenseIndexer`). Nothing else of the index is touched, so a Ray
fan-out over index shards, a remote service or an index imported from another tool can stand in for the
local `DenseIndex`, as long as it implements these five members.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from latentrag.retrieval.corpus import Passage


class EncoderRecord(Protocol):
    """What the searcher says about the document tower that encoded its vectors (an index manifest)."""

    encoder: dict  # at least {"name": ..., "sha256": ...}: the retriever refuses another tower's vectors


@runtime_checkable
class Searcher(Protocol):
    """Top-k maximum inner product search over stored document vectors d(z), with the passages' texts."""

    manifest: EncoderRecord

    @property
    def dim(self) -> int:
        """The vectors' dimension d (must equal the query tower's)."""
        ...

    def __len__(self) -> int:
        """How many passages can be returned (k may not exceed it)."""
        ...

    def search_with_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """queries (B,d) float32 -> scores (B,k) float32, ids (B,k) int64 best first (−1 where fewer than k
        were found), vectors (B,k,d) float32: the stored d(z) of each id (zeros where the id is −1)."""
        ...

    def passages(self, ids: np.ndarray) -> list[list[Passage]]:
        """The passages for ids (B,k), row by row."""
        ...
