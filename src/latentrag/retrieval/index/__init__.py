"""The dense index: document vectors d(z) in faiss for maximum inner product search (paper §2.2).

`manifest` (the folder's files and what built them), `faiss_io` (reading, parameters, threads),
`flat_search` (exact search as blocked GEMM), `dense_index` (the searcher), `build` (encode, assemble, add),
`edit` (replace passages, re-encoding only those).
"""

from latentrag.retrieval.index.build import (
    CHUNK_SIZE,
    add_corpus_to_index,
    add_to_index,
    build_corpus_index,
    build_index,
    build_index_from_vectors,
    check_index_target,
    chunk_count,
    default_index,
    encode_passages,
)
from latentrag.retrieval.index.dense_index import DenseIndex, index_info
from latentrag.retrieval.index.edit import EDITS, replace_passages
from latentrag.retrieval.index.manifest import EXACT, MANIFEST, PASSAGES, VECTORS, Manifest
from latentrag.retrieval.index_plan import INDEX_TYPES

__all__ = [
    "CHUNK_SIZE",
    "EDITS",
    "EXACT",
    "INDEX_TYPES",
    "MANIFEST",
    "PASSAGES",
    "VECTORS",
    "DenseIndex",
    "Manifest",
    "add_corpus_to_index",
    "add_to_index",
    "build_corpus_index",
    "build_index",
    "build_index_from_vectors",
    "check_index_target",
    "chunk_count",
    "default_index",
    "encode_passages",
    "index_info",
    "replace_passages",
]
