"""Scale-out benchmark: distributed encoding and sharded search on a local Ray cluster, each figure against its
single-process peer measured in the same run.

    .venv/bin/python benchmarks/sharded.py --quick      # under a minute; last line is a JSON object
    .venv/bin/python benchmarks/sharded.py --out benchmarks/results/sharded

1. encoding passages/s of `build_sharded_index` (ray.data, MiniLM on encoder actors of half a CPU request and one thread
   each) with 1 and 2 workers vs `encode_passages` in this process on one thread, same passages and batch.
   Two rates: the whole pipeline (actor start-up included) and the steady state after the first saved block.
2. queries/s of `ShardedIndex` with 1 and 2 shards (one thread each) vs `DenseIndex.search` in this process
   (one thread) on the same flat vectors, results checked identical (ids and scores); the Ray path's overhead
   at one shard = its time / the in-process time - 1, per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def bench_encoding(passages, encoder, root: Path, chunk: int, batch: int, workers_list: list[int]) -> dict:
    from latentrag.distributed.encoding import build_sharded_index
    from latentrag.retrieval.index import encode_passages

    titles, texts = [p.title for p in passages], [p.text for p in passages]
    encode_passages(encoder, titles[:batch], texts[:batch], batch)  # warm-up
    t = time.perf_counter()
    encode_passages(encoder, titles, texts, batch)
    single = len(passages) / (time.perf_counter() - t)
    out = {"passages": len(passages), "chunk": chunk, "batch": batch, "single_process_per_s": single}
    for workers in workers_list:
        report = build_sharded_index(passages, encoder, root / f"enc-{workers}", shards=workers, batch_size=batch,
                                     progress=False, workers=workers, num_cpus=0.5, threads=1, chunk_size=chunk)
        steady_rows = len(passages) - chunk
        steady_s = report.encode_seconds - report.first_block_seconds
        out[f"ray_{workers}_per_s"] = len(passages) / report.encode_seconds
        out[f"ray_{workers}_steady_per_s"] = steady_rows / steady_s if steady_s > 0 and steady_rows > 0 else None
        out[f"ray_{workers}_per_actor_s"] = len(passages) / report.actor_seconds  # inside encode_passages only
        log(f"encoding with {workers} Ray worker(s): {out[f'ray_{workers}_per_s']:.0f} passages/s "
            f"(steady {out[f'ray_{workers}_steady_per_s'] or 0:.0f}, per actor {out[f'ray_{workers}_per_actor_s']:.0f}); "
            f"one process: {single:.0f}")
    return out


def bench_search(n: int, dim: int, root: Path, batches: list[int], repeats: int, k: int = 10) -> dict:
    from latentrag.distributed.sharded import ShardedIndex, build_sharded_from_vectors
    from latentrag.retrieval.corpus import Passage
    from latentrag.retrieval.index import build_index_from_vectors

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    passages = [Passage(f"p{i}", "", "") for i in range(n)]
    identity = {"name": "synthetic", "sha256": "0" * 64}
    flat = build_index_from_vectors(vectors, passages, root / "flat", identity)
    searchers = {"in_process": flat}
    for shards in (1, 2):
        build_sharded_from_vectors(vectors, passages, root / f"shards-{shards}", identity, shards)
        searchers[f"ray_{shards}"] = ShardedIndex(root / f"shards-{shards}", num_cpus=0.5, threads=1)
    out = {"passages": n, "dim": dim, "k": k, "identical": True}
    for b in batches:
        queries = rng.standard_normal((b, dim)).astype(np.float32)
        want = flat.search(queries, k)
        times: dict[str, list[float]] = {name: [] for name in searchers}
        for s in searchers.values():  # warm-up + identity check
            got = s.search(queries, k)
            out["identical"] &= bool(np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]))
        for _ in range(repeats):  # interleaved: load from other processes hits every searcher alike
            for name, s in searchers.items():
                t = time.perf_counter()
                s.search(queries, k)
                times[name].append(time.perf_counter() - t)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        row = {f"{name}_qps": b / m for name, m in median.items()}
        row["ray_1_overhead"] = median["ray_1"] / median["in_process"] - 1
        row["ray_2_speedup"] = median["in_process"] / median["ray_2"]
        out[f"batch_{b}"] = row
        log(f"batch {b}: " + ", ".join(f"{key} {value:.3g}" for key, value in row.items()))
    for name, s in searchers.items():
        if name != "in_process":
            s.close()
    return out


def markdown(r: dict) -> str:
    e, s = r["encoding"], r["search"]
    lines = [
        "# Scale-out benchmark (Ray)", "",
        f"Reproduce: `{r['command']}`", "",
        f"Machine: {r['machine']['cores']} cores, load average {r['machine']['load_average']} (shared with other "
        "jobs: ratios within one run are the figures to read; absolute rates are low and noisy). A local Ray "
        "cluster of 2 CPUs; each encoder actor or shard actor requests 0.5 CPU and runs 1 thread.", "",
        f"Encoding: {e['passages']} wiki-leads passages, MiniLM, batch {e['batch']}, blocks of {e['chunk']}.", "",
        "Whole pipeline: passages / wall time of the encoding phase, actor start-up included. Steady state: "
        "passages after the first saved block / the time after it (an upper bound: blocks an actor finished "
        "while the first was in transit count as instant). Per actor: passages / seconds the actors spent "
        "inside `encode_passages`, summed over actors (the compute rate of one actor, Ray excluded).", "",
        "| encoder | passages/s (whole pipeline) | steady state | per actor | whole pipeline vs one process |",
        "|---|---|---|---|---|",
        f"| one process, one thread | {e['single_process_per_s']:.0f} | | | 1.00× |",
    ]
    for w in (1, 2):
        if f"ray_{w}_per_s" in e:
            rate, steady, single = e[f"ray_{w}_per_s"], e[f"ray_{w}_steady_per_s"], e["single_process_per_s"]
            steady_cell = "" if steady is None else f"{steady:.0f}"
            steady_ratio = "" if steady is None else f" ({steady / single:.2f}× steady)"
            actor = e.get(f"ray_{w}_per_actor_s")
            actor_cell = "" if actor is None else f"{actor:.0f}"
            lines.append(f"| Ray, {w} worker(s) | {rate:.0f} | {steady_cell} | {actor_cell} | "
                         f"{rate / single:.2f}×{steady_ratio} |")
    lines += [
        "", f"Search: {s['passages']:,} × {s['dim']} flat vectors, k={s['k']}; results identical to the in-process "
        f"index (ids and scores): **{s['identical']}**.", "",
        "| batch | in-process q/s | Ray 1 shard q/s | Ray 2 shards q/s | Ray overhead at 1 shard (goal ≤ 15 %) | "
        "2 shards vs in-process |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in s.items():
        if key.startswith("batch_"):
            lines.append(f"| {key[6:]} | {row['in_process_qps']:.0f} | {row['ray_1_qps']:.0f} | {row['ray_2_qps']:.0f} | "
                         f"{row['ray_1_overhead']:+.1%} | {row['ray_2_speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--out", default=None, help="write JSON + Markdown results with this stem")
    parser.add_argument("--encode-workers", type=int, nargs="+", default=None,
                        help="Ray encoder worker counts to measure (default: 2 with --quick, else 1 2)")
    args = parser.parse_args()
    quick = args.quick

    import ray

    from latentrag.cli import _quiet_transformers
    from latentrag.retrieval.corpus import read_corpus, split_passages
    from latentrag.retrieval.encoders import DenseEncoder, freeze
    from latentrag.threads import configure_threads

    configure_threads(1)
    _quiet_transformers()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = {
        "command": " ".join(["python benchmarks/sharded.py"] + sys.argv[1:]),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__,
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder = freeze(DenseEncoder.from_pretrained("minilm"))
        passages = []
        for p in split_passages(read_corpus("wiki-leads"), words=100):
            passages.append(p)
            if len(passages) == (64 if quick else 2048):
                break
        workers = args.encode_workers or ([2] if quick else [1, 2])
        results["encoding"] = bench_encoding(passages, encoder, root, 16 if quick else 128, 16 if quick else 32,
                                             workers)
        results["search"] = bench_search(50_000 if quick else 200_000, 384, root, [1, 256] if quick else [1, 16, 256],
                                         5 if quick else 15)
    ray.shutdown()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(markdown(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
