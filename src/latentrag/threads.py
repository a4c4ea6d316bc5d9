"""Thread counts: torch and faiss use the cores this process owns, not the machine's (oversubscription costs 3x)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> int:
    """Set torch and faiss thread pools to `n` (default: the cores we own). Returns the count used."""
    import faiss
    import torch

    n = n or int(os.environ.get("LATENTRAG_THREADS", 0)) or available_cores()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n
