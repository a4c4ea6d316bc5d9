"""faiss files and settings: reading (memory-mapped where the type allows), search parameters, threads."""

from __future__ import annotations

from pathlib import Path

import faiss
import torch

from latentrag.errors import LatentRagError
from latentrag.threads import available_cores


def limit_threads() -> None:
    """faiss and torch never use more threads than the cores this process owns (oversubscription costs 3x)."""
    cores = available_cores()
    if faiss.omp_get_max_threads() > cores:
        faiss.omp_set_num_threads(cores)
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


def read_faiss(path: Path, mmap: bool) -> faiss.Index:
    """Read an index; with mmap the flat codes stay in the file's pages (shared between processes)."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        if mmap:  # a type faiss cannot map in place: read it into memory instead
            try:
                return faiss.read_index(str(path), 0)
            except RuntimeError:
                pass
        raise LatentRagError(f"{path}: not a readable faiss index ({str(e).splitlines()[0]}); rebuild it") from e


def apply_search_params(index: faiss.Index, params: dict) -> None:
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
