"""Retrieval benchmark: latentrag's index against its peers, every figure a ratio measured in the same run.

    .venv/bin/python benchmarks/retrieval.py --quick      # under a minute; last line is a JSON object
    .venv/bin/python benchmarks/retrieval.py              # the full run written to benchmarks/results/

1. search overhead: DenseIndex.search vs raw faiss `index.search` on the same index and queries
2. exact (flat) search GFLOP/s vs a numpy GEMM of the same shapes (B,d)·(d,N)
3. recall@10 vs exact search and queries/s for HNSW and IVF types, on the real MiniLM embeddings of the
   wiki-leads corpus with real questions (NQ dev), sweeping efSearch / nprobe
4. document encoding passages/s vs sentence-transformers `encode` (same model, inputs, batch, threads)
5. resident memory of a process that loaded a flat index of 1M synthetic passages vs the file size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from latentrag.defaults import PASSAGE_WORDS
from latentrag.retrieval.corpus import Passage, read_corpus, split_passages, write_passage_store
from latentrag.retrieval.index import (
    DenseIndex,
    Manifest,
    build_index_from_vectors,
    encode_passages,
)
from latentrag.threads import configure_threads

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(a, b, repeats: int, settle: float = 0.0) -> tuple[list[float], list[float]]:
    """Alternate a and b so load from other processes hits both alike; `settle` seconds of sleep (untimed)
    before each call let the other's idle worker threads stop spinning first."""
    ta, tb = [], []
    for _ in range(repeats):
        time.sleep(settle)
        ta += timed(a, 1)
        time.sleep(settle)
        tb += timed(b, 1)
    return ta, tb


# OpenBLAS (numpy) worker threads keep spinning for ~0.1 s after a product returns: a torch call started
# right after one ran with one core fewer (flat search measured 0.5-0.8x of GEMM speed that way, 0.9-1.06x
# with this pause before each of the two, 50k and 200k passages). Both sides get the same pause.
SETTLE_S = 0.25


# ---- data ---------------------------------------------------------------------------------------------
def wiki_vectors(encoder, encode_limit: int | None, log) -> tuple[np.ndarray, list[Passage], str]:
    """MiniLM document vectors of the wiki-leads passages: all of them from the cached default index when
    it was built by this very encoder (the `latentrag demo` index), else the first `encode_limit` encoded here."""
    from latentrag.assets import default_index_dir

    cached = default_index_dir()
    if (cached / "manifest.json").exists():
        manifest = Manifest.read(cached)
        if manifest.encoder.get("sha256") == encoder.fingerprint():
            index = DenseIndex.load(cached)
            n = len(index)
            vectors = index.reconstruct(np.arange(n)[:, None])[:, 0]
            return np.ascontiguousarray(vectors), index.store.get(range(n)), f"cached index {cached}"
    passages = list(split_passages(read_corpus("wiki-leads"), words=PASSAGE_WORDS))[:encode_limit]
    log(f"encoding {len(passages)} wiki-leads passages (no cached default index)")
    vectors = encode_passages(encoder, [p.title for p in passages], [p.text for p in passages])
    return vectors, passages, "encoded in this run"


def nq_questions(n: int) -> list[str]:
    from latentrag.evaluation.datasets import load_dataset

    return [ex.question for ex in load_dataset("nq-dev", limit=n)]


# ---- 1 + 2: search overhead and flat GFLOP/s ------------------------------------------------------------
def bench_overhead(indexes: dict[str, DenseIndex], queries: np.ndarray, repeats: int) -> dict:
    """Wrapper overhead where latentrag delegates to faiss (HNSW); flat is latentrag's own GEMM path."""
    out = {name: _overhead(index, queries, repeats) for name, index in indexes.items()}
    out["overhead"] = max(out["hnsw"][b]["overhead"] for b in ("batch1", "batch64"))
    return out


def _overhead(index: DenseIndex, queries: np.ndarray, repeats: int) -> dict:
    out = {}
    for batch in (1, 64):
        q = np.ascontiguousarray(queries[:batch])
        index.search(q, 10), index.faiss.search(q, 10)  # warm up
        inner = max(1, 64 // batch)

        def ours(q=q, inner=inner):
            for _ in range(inner):
                index.search(q, 10)

        def raw(q=q, inner=inner):
            for _ in range(inner):
                index.faiss.search(q, 10)

        t_ours, t_raw = interleaved(ours, raw, repeats)
        ratio = statistics.median(t_ours) / statistics.median(t_raw)
        out[f"batch{batch}"] = {
            "latentrag_ms": 1e3 * statistics.median(t_ours) / inner,
            "faiss_ms": 1e3 * statistics.median(t_raw) / inner,
            "overhead": ratio - 1,
        }
    return out


def bench_flat_gflops(n: int, dim: int, batch: int, repeats: int, root: Path) -> dict:
    """DenseIndex.search on a flat index (exact top-10) vs numpy's GEMM producing the same (B, N) scores,
    interleaved, each call after a SETTLE_S pause; best of `repeats` each."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    q = rng.standard_normal((batch, dim), dtype=np.float32)
    passages = (Passage(f"p{i}", "", "") for i in range(n))
    index = build_index_from_vectors(x, passages, root / "gflops", {"name": "synthetic", "sha256": "0"}, "flat")
    flops = 2.0 * batch * n * dim
    index.search(q, 10), q @ x.T, index.faiss.search(q, 10)  # warm up
    t_ours, t_gemm = interleaved(lambda: index.search(q, 10), lambda: q @ x.T, repeats, SETTLE_S)
    time.sleep(SETTLE_S)
    t_faiss = timed(lambda: index.faiss.search(q, 10), max(1, repeats // 2))
    ours, gemm, raw = (flops / min(t) / 1e9 for t in (t_ours, t_gemm, t_faiss))
    return {
        "shape": {"queries": batch, "passages": n, "dim": dim, "k": 10},
        "latentrag_flat_gflops": ours,
        "numpy_gemm_gflops": gemm,
        "raw_faiss_flat_gflops": raw,
        "ratio": ours / gemm,
    }


def timed_build(vectors: np.ndarray, passages: list[Passage], identity: dict, root: Path,
                kind: str) -> tuple[DenseIndex, float]:
    t = time.perf_counter()
    index = build_index_from_vectors(vectors, passages, root / kind, identity, kind)
    return index, time.perf_counter() - t


# ---- 3: recall vs exact --------------------------------------------------------------------------------
SWEEPS = {
    "hnsw": ("ef_search", [16, 32, 64, 128, 256]),
    "hnsw-sq8": ("ef_search", [16, 32, 64, 128, 256]),
    "ivf-sq8": ("nprobe", [1, 4, 8, 16, 32, 64]),
    "ivf-pq": ("nprobe", [1, 4, 8, 16, 32, 64]),
}


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def bench_recall(vectors: np.ndarray, passages: list[Passage], identity: dict, queries: np.ndarray, root: Path,
                 repeats: int, log, kinds: list[str], built: dict[str, tuple[DenseIndex, float]]) -> dict:
    """`built`: indexes of these vectors already built in this run (kind -> index, build seconds), reused."""

    def build(kind: str) -> tuple[DenseIndex, float]:
        if kind not in built:
            built[kind] = timed_build(vectors, passages, identity, root, kind)
        return built[kind]

    exact = build("flat")[0]
    _, truth = exact.search(queries, 10)
    t_flat = min(timed(lambda: exact.search(queries, 10), repeats))
    out = {"flat": {"qps": len(queries) / t_flat, "recall@10": 1.0}}
    for kind in kinds:
        knob, values = SWEEPS[kind]
        index, build_s = build(kind)
        default = index.search_params.get("efSearch" if knob == "ef_search" else "nprobe")
        rows = []
        for value in sorted(set(values) | {default}):
            if knob == "nprobe" and value > index.manifest.params["nlist"]:
                continue
            index.set_search_params(**{knob: value})
            _, found = index.search(queries, 10)
            seconds = min(timed(lambda index=index: index.search(queries, 10), repeats))
            rows.append({knob: value, "recall@10": recall_at(found, truth), "qps": len(queries) / seconds})
        if index.vectors is not None:  # compressed types: more exact re-ranking at the default knob
            index.set_search_params(**{knob: default})
            for refine in (8, 16):
                index.set_search_params(refine=refine)
                _, found = index.search(queries, 10)
                seconds = min(timed(lambda index=index: index.search(queries, 10), repeats))
                rows.append({knob: default, "refine": refine, "recall@10": recall_at(found, truth),
                             "qps": len(queries) / seconds})
            index.set_search_params(refine=index.manifest.params["refine"])
        meeting = [r for r in rows if r["recall@10"] >= 0.98]
        out[kind] = {
            "factory": index.manifest.factory,
            "params": index.manifest.params,
            "build_s": build_s,
            "default": next(r for r in rows if r[knob] == default and "refine" not in r),
            "first_at_0.98": meeting[0] if meeting else None,
            "sweep": rows,
        }
        log(f"{kind}: default {out[kind]['default']}")
    return out


# ---- 4: encoding vs sentence-transformers ---------------------------------------------------------------
def bench_encoding(encoder, passages: list[Passage], batch_size: int, repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from latentrag.assets import minilm_dir

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    st.max_seq_length = encoder.max_length
    titles, texts = [p.title for p in passages], [p.text for p in passages]
    pairs = [[a, b] for a, b in zip(titles, texts, strict=True)]
    ours = encode_passages(encoder, titles, texts, batch_size)
    theirs = st.encode(pairs, batch_size=batch_size, convert_to_numpy=True)
    t_ours, t_st = interleaved(
        lambda: encode_passages(encoder, titles, texts, batch_size),
        lambda: st.encode(pairs, batch_size=batch_size, convert_to_numpy=True),
        repeats,
    )
    ours_rate, st_rate = len(passages) / min(t_ours), len(passages) / min(t_st)
    return {
        "passages": len(passages),
        "batch_size": batch_size,
        "latentrag_passages_per_s": ours_rate,
        "sentence_transformers_passages_per_s": st_rate,
        "ratio": ours_rate / st_rate,
        "max_abs_difference": float(np.abs(ours - theirs).max()),
    }


# ---- 5: resident memory of a memory-mapped flat index ---------------------------------------------------
_RSS_CHILD = """
import json, sys, numpy as np, psutil
def status():
    fields = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'RssAnon', 'RssFile')):
            name, value = line.split(':')
            fields[name] = int(value.split()[0]) * 1024
    return fields
import latentrag.retrieval.index as li
base = status()
index = li.DenseIndex.load(sys.argv[1], mmap=sys.argv[2] == '1')
loaded = status()
index.search(np.random.default_rng(0).standard_normal((8, index.dim), dtype=np.float32), 10)
searched = status()
print(json.dumps({'before': base, 'loaded': loaded, 'searched': searched}))
"""


def bench_rss(n: int, dim: int, root: Path, parallel: bool = False) -> dict:
    """Memory of one child process that memory-maps the index and one that reads it (at once when `parallel`:
    each child measures only its own memory, so running them together changes no figure, only the wall time)."""
    directory = root / "rss-flat"
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    for start in range(0, n, 100_000):
        index.add(rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32))
    directory.mkdir(parents=True)
    faiss.write_index(index, str(directory / "vectors.faiss"))
    del index
    write_passage_store(directory / "passages.arrow", (Passage(f"p{i}", "", f"passage {i}") for i in range(n)))
    Manifest(encoder={"name": "synthetic", "sha256": "0" * 64}, dim=dim, count=n, index_type="flat",
             factory="Flat", version="bench").write(directory)
    file_bytes = (directory / "vectors.faiss").stat().st_size
    out = {"passages": n, "dim": dim, "index_file_bytes": file_bytes,
           "store_file_bytes": (directory / "passages.arrow").stat().st_size}
    modes = (("mmap", "1"), ("read", "0"))

    def child(flag: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(directory), flag], stdout=subprocess.PIPE,
                                text=True)

    children = {mode: child(flag) for mode, flag in modes} if parallel else {}
    for mode, flag in modes:
        process = children.get(mode) or child(flag)
        stdout, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"the {mode} memory child failed (exit {process.returncode})")
        r = json.loads(stdout.strip().splitlines()[-1])
        out[mode] = {
            "rss_after_load_bytes": r["loaded"]["VmRSS"] - r["before"]["VmRSS"],
            "anon_after_load_bytes": r["loaded"]["RssAnon"] - r["before"]["RssAnon"],
            "rss_after_search_bytes": r["searched"]["VmRSS"] - r["before"]["VmRSS"],
            "anon_after_search_bytes": r["searched"]["RssAnon"] - r["before"]["RssAnon"],
            "file_backed_after_search_bytes": r["searched"]["RssFile"] - r["before"]["RssFile"],
        }
        out[mode]["private_memory_over_file"] = out[mode]["anon_after_search_bytes"] / file_bytes
    return out


# ---- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--out", default=None, help="write JSON + Markdown results with this stem")
    args = parser.parse_args(argv)
    quick = args.quick
    threads = configure_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    from latentrag.retrieval.encoders import DenseEncoder, freeze

    encoder = freeze(DenseEncoder.from_pretrained("minilm"))
    results: dict = {
        "command": "python benchmarks/retrieval.py" + (" --quick" if quick else ""),
        "machine": {"cores": threads, "platform": platform.platform(), "faiss": faiss.__version__,
                    "load_average": os.getloadavg()},
    }
    root = Path(tempfile.mkdtemp(prefix="latentrag-bench-"))
    try:
        vectors, passages, source = wiki_vectors(encoder, 1500 if quick else None, log)
        log(f"{len(vectors)} passage vectors ({source})")
        questions = nq_questions(300 if quick else 2000)
        queries = encoder.encode(questions, batch_size=128).numpy()
        log(f"{len(queries)} NQ dev questions encoded")
        identity = encoder.identity()

        # built once, for the overhead and the recall figures
        built = {kind: timed_build(vectors, passages, identity, root, kind) for kind in ("flat", "hnsw")}
        results["search_overhead"] = bench_overhead({kind: built[kind][0] for kind in ("flat", "hnsw")}, queries,
                                                    5 if quick else 40)
        log(f"search overhead {results['search_overhead']['overhead']:+.1%}")

        results["flat_gflops"] = bench_flat_gflops(50_000 if quick else 200_000, 384, 256, 5 if quick else 7, root)
        log(f"flat search {results['flat_gflops']['ratio']:.0%} of numpy GEMM")

        kinds = ["hnsw", "ivf-sq8"] if quick else list(SWEEPS)  # ivf-pq's PQ64 training takes ~1 min here
        results["recall"] = bench_recall(vectors, passages, identity, queries, root, 2 if quick else 5, log, kinds,
                                         built)
        results["recall"]["corpus"] = {"passages": len(vectors), "questions": len(queries), "source": source,
                                       "dataset": "nq-dev (DPR split from the pyserini 0.21.0 jar)"}

        size = 32 if quick else 256  # quick: one batch of 32 (the 3 passes per library took ~15 s at 64)
        sample = passages[:: max(1, len(passages) // size)][:size]
        results["encoding"] = bench_encoding(encoder, sample, 32, 2)
        log(f"encoding {results['encoding']['ratio']:.2f}x sentence-transformers")

        results["memory"] = bench_rss(50_000 if quick else 1_000_000, 384, root, parallel=quick)
        log(f"mmap flat index: private memory {results['memory']['mmap']['private_memory_over_file']:.1%} "
            "of the file")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["seconds"] = time.time() - started
    results["summary"] = summary(results)
    if args.out:
        write_results(results, Path(args.out))
    print(json.dumps(results["summary"]))
    return 0


def summary(r: dict) -> dict:
    rec = r["recall"]
    return {
        "search_overhead": round(r["search_overhead"]["overhead"], 4),
        "flat_time_vs_faiss": round(1 + r["search_overhead"]["flat"]["batch64"]["overhead"], 3),
        "flat_gflops_vs_gemm": round(r["flat_gflops"]["ratio"], 3),
        "raw_faiss_flat_gflops_vs_gemm": round(
            r["flat_gflops"]["raw_faiss_flat_gflops"] / r["flat_gflops"]["numpy_gemm_gflops"], 3),
        "recall@10": {k: round(v["default"]["recall@10"], 4) for k, v in rec.items() if "default" in v},
        "qps": {k: round(v["default"]["qps"] if "default" in v else v["qps"], 1) for k, v in rec.items()
                if k != "corpus"},
        "encoding_vs_sentence_transformers": round(r["encoding"]["ratio"], 3),
        "mmap_private_memory_over_file": round(r["memory"]["mmap"]["private_memory_over_file"], 4),
        "read_private_memory_over_file": round(r["memory"]["read"]["private_memory_over_file"], 4),
    }


def write_results(results: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    s, rec = results["summary"], results["recall"]
    lines = [
        "# Retrieval benchmark",
        "",
        f"Reproduce: `.venv/bin/python {results['command'].removeprefix('python ')} --out {stem}`",
        "",
        f"Machine: {results['machine']['cores']} cores, load average {results['machine']['load_average']} "
        "(shared; every figure is a ratio to a peer measured in the same run).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| DenseIndex.search overhead vs raw faiss (HNSW, k=10, batch 1 and 64) | {s['search_overhead']:+.1%} | ≤ 10 % |",
        f"| flat DenseIndex.search time vs raw faiss flat search (batch 64) | {s['flat_time_vs_faiss']:.2f}× | |",
        f"| exact flat search GFLOP/s vs numpy GEMM | {s['flat_gflops_vs_gemm']:.0%} | ≥ 80 % |",
        f"| document encoding vs sentence-transformers | {s['encoding_vs_sentence_transformers']:.2f}× | ≥ 1.0× |",
        f"| private memory of a process with a mmapped flat index / file size ({results['memory']['passages']:,}"
        f" × 384) | {s['mmap_private_memory_over_file']:.1%} (read into RAM: {s['read_private_memory_over_file']:.0%}) |"
        " small |",
        "",
        f"Recall@10 vs exact on {rec['corpus']['passages']:,} wiki-leads MiniLM vectors, "
        f"{rec['corpus']['questions']:,} NQ dev questions (default settings; compressed types re-rank 4·k "
        "candidates with the exact vectors):",
        "",
        "| type | factory | setting | recall@10 | queries/s | first setting ≥ 0.98 |",
        "|---|---|---|---|---|---|",
        f"| flat | Flat | exact | 1.000 | {rec['flat']['qps']:.0f} | |",
    ]
    for kind in [k for k in SWEEPS if k in rec]:
        v = rec[kind]
        d = v["default"]
        knob = next(key for key in d if key not in ("recall@10", "qps", "refine"))
        first = v["first_at_0.98"]
        refine = f", refine={first['refine']}" if first and "refine" in first else ""
        first_s = f"{knob}={first[knob]}{refine} ({first['recall@10']:.3f}, {first['qps']:.0f} q/s)" if first else "none"
        lines.append(f"| {kind} | {v['factory']} | {knob}={d[knob]} | {d['recall@10']:.3f} | {d['qps']:.0f} | {first_s} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
