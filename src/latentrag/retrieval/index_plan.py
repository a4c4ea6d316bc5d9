"""Index types: their faiss factory strings and parameters, and the memory each needs (for sizing).

| type       | faiss factory      | reconstruct d(z)    | bytes per vector (faiss)          | fixed bytes                       |
|------------|--------------------|---------------------|-----------------------------------|-----------------------------------|
| `flat`     | `Flat`             | exact               | 4·d                               | —                                 |
| `hnsw`     | `HNSW32,Flat`      | exact               | 4·d + 4·(2M + M/(M−1)) + 12       | —                                 |
| `hnsw-sq8` | `HNSW32,SQ8`       | exact via .npy      | d + 4·(2M + M/(M−1)) + 12         | 2·4·d (SQ ranges)                 |
| `ivf-sq8`  | `IVF{nlist},SQ8`   | exact via .npy      | d + 8 (id in the inverted list)   | (4·d + 8)·nlist (centroids, list sizes) + 2·4·d |
| `ivf-pq`   | `IVF{nlist},PQ{m}` | exact via .npy      | m + 8                             | (4·d + 8)·nlist + 4·d·2^nbits (PQ codebooks)    |

HNSW: level 0 holds 2M neighbour ids (int32), and a vector reaches level l ≥ 1 with probability M^−l,
each upper level holding M more, so the expected neighbour ids per vector are 2M + M·Σ M^−l =
2M + M/(M−1); faiss also keeps the level (int32) and an offset (size_t) per vector: 12 bytes.
IVF: each vector's code sits in one inverted list next to its 64-bit id. With `exact_vectors=False`
an IVF index also keeps a direct map (8 bytes per vector) so that faiss itself can reconstruct.

Compressed types keep the exact float32 vectors in a memory-mapped `vectors.npy` (4·d bytes per vector
on disk, paged in only for the rows a search touches), used to re-rank the candidates and for d(z):
retrieval scores stay the exact inner products the paper's p_η(z|x) is computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from latentrag.errors import LatentRagError

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 192  # recall@10 0.991 vs exact on wiki-leads/MiniLM with 1,000 NQ dev questions (128: 0.982)
PQ_M = 64
REFINE_FACTOR = 4  # compressed types fetch k·4 candidates and re-rank them with the exact vectors


@dataclass(frozen=True)
class IndexType:
    name: str
    description: str
    trained: bool  # needs a training sample (k-means / quantizer ranges)
    exact_reconstruct: bool  # faiss reconstructs the float32 vectors exactly


INDEX_TYPES: dict[str, IndexType] = {
    t.name: t
    for t in (
        IndexType("flat", "exact search; memory-mapped on load", False, True),
        IndexType("hnsw", "HNSW graph over float32 vectors; efSearch trades speed for recall", False, True),
        IndexType("hnsw-sq8", "HNSW graph over 8-bit scalar-quantised vectors", True, False),
        IndexType("ivf-sq8", "inverted lists (k-means cells) of 8-bit scalar-quantised vectors; nprobe", True, False),
        IndexType("ivf-pq", "inverted lists of product-quantised codes (PQ64): smallest in memory; nprobe", True, False),
    )
}


def index_type(name: str) -> IndexType:
    if name not in INDEX_TYPES:
        raise LatentRagError(f"unknown index type '{name}': choose one of {', '.join(INDEX_TYPES)}")
    return INDEX_TYPES[name]


def ivf_nlist(n: int) -> int:
    """~4·sqrt(N) cells, at most N/39 so that k-means has its 39 training points per centroid."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def ivf_nprobe(nlist: int) -> int:
    """Default cells visited per query: at least 128, else 2·sqrt(nlist) (128 of 281 cells at 11k passages,
    where recall@10 is 0.982 on MiniLM/NQ dev; 271 of 18,330 at 21M). Check recall with
    `benchmarks/retrieval.py` on your corpus and set `nprobe` at load for the trade-off you need."""
    return max(1, min(nlist, max(128, round(2 * math.sqrt(nlist)))))


def pq_m(dim: int, target: int = PQ_M) -> int:
    """Sub-quantisers: 64 when it divides d (384 = 64·6, 768 = 64·12), else the largest divisor of d below 64."""
    return max(m for m in range(1, min(target, dim) + 1) if dim % m == 0)


def train_size(n: int, nlist: int) -> int:
    """Vectors sampled to train a quantiser: 100 per cell, at least 10,000 (or all, if fewer)."""
    return min(n, max(100 * nlist, 10_000))


def default_params(name: str, n: int, dim: int) -> dict:
    """Construction and search parameters a build records in its manifest (search ones settable at load)."""
    index_type(name)
    if name == "flat":
        return {}
    if name in ("hnsw", "hnsw-sq8"):
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    else:
        nlist = ivf_nlist(n)
        params = {"nlist": nlist, "nprobe": ivf_nprobe(nlist), "train_size": train_size(n, nlist)}
        if name == "ivf-pq":
            params["m"] = pq_m(dim)
            params["nbits"] = min(8, int(math.log2(max(2, params["train_size"]))))
    if name in ("hnsw-sq8",):
        params["train_size"] = min(n, 65_536)
    if not INDEX_TYPES[name].exact_reconstruct:
        params["refine"] = REFINE_FACTOR
    return params


def factory_string(name: str, params: dict) -> str:
    """The faiss `index_factory` string (always used with METRIC_INNER_PRODUCT)."""
    if name == "flat":
        return "Flat"
    if name == "hnsw":
        return f"HNSW{params['M']},Flat"
    if name == "hnsw-sq8":
        return f"HNSW{params['M']},SQ8"
    if name == "ivf-sq8":
        return f"IVF{params['nlist']},SQ8"
    if name == "ivf-pq":
        return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}"
    raise LatentRagError(f"unknown index type '{name}'")


def hnsw_links_bytes(m: int = HNSW_M) -> float:
    """Expected graph bytes per vector: 4·(2M + M/(M−1)) neighbour ids + 4 (level) + 8 (offset)."""
    return 4 * (2 * m + m / (m - 1)) + 12


def memory_bytes(name: str, n: int, dim: int, params: dict | None = None, exact_vectors: bool = True) -> dict:
    """Bytes the faiss index needs in memory (≈ its serialized size) and on disk, by the formulas above."""
    params = params or default_params(name, n, dim)
    per_vector: float
    fixed = 0.0
    if name == "flat":
        per_vector = 4 * dim
    elif name == "hnsw":
        per_vector = 4 * dim + hnsw_links_bytes(params["M"])
    elif name == "hnsw-sq8":
        per_vector = dim + hnsw_links_bytes(params["M"])
        fixed = 2 * 4 * dim
    elif name == "ivf-sq8":
        per_vector = dim + 8
        fixed = 4 * dim * params["nlist"] + 8 * params["nlist"] + 2 * 4 * dim
    elif name == "ivf-pq":
        per_vector = params["m"] * params["nbits"] / 8 + 8
        fixed = 4 * dim * params["nlist"] + 8 * params["nlist"] + 4 * dim * 2 ** params["nbits"]
    else:
        raise LatentRagError(f"unknown index type '{name}'")
    if name.startswith("ivf") and not exact_vectors:
        per_vector += 8  # direct map, so that faiss can reconstruct by id
    index_bytes = per_vector * n + fixed
    stores_exact = exact_vectors and not INDEX_TYPES[name].exact_reconstruct
    exact_bytes = 4 * dim * n if stores_exact else 0
    return {
        "index_type": name,
        "factory": factory_string(name, params),
        "params": params,
        "bytes_per_vector": per_vector,
        "fixed_bytes": fixed,
        "memory_bytes": int(round(index_bytes)),
        "exact_vectors_bytes": exact_bytes,  # on disk, memory-mapped: only touched rows are paged in
        "disk_bytes": int(round(index_bytes)) + exact_bytes,
    }


def plan(passages: int, dim: int, types: list[str] | None = None, exact_vectors: bool = True) -> dict:
    """The memory every index type would need for `passages` vectors of `dim` dimensions."""
    if passages < 1 or dim < 1:
        raise LatentRagError(f"give a positive number of passages and dimensions (got {passages}, {dim})")
    rows = [memory_bytes(t, passages, dim, exact_vectors=exact_vectors) for t in (types or list(INDEX_TYPES))]
    return {"passages": passages, "dim": dim, "types": rows}


def format_plan(result: dict) -> str:
    def gib(b: float) -> str:
        return f"{b / 2**30:10.2f} GiB"

    lines = [f"{result['passages']:,} passages × {result['dim']} dims", ""]
    lines.append(f"{'type':10} {'factory':22} {'B/vector':>9} {'memory':>14} {'+ exact .npy':>14}")
    for row in result["types"]:
        lines.append(
            f"{row['index_type']:10} {row['factory']:22} {row['bytes_per_vector']:9.1f} {gib(row['memory_bytes'])} "
            f"{gib(row['exact_vectors_bytes'])}"
        )
    return "\n".join(lines)
