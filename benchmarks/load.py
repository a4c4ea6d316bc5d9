"""Load on the HTTP service: N concurrent clients on loopback, an index swap in the middle, and the
throughput of micro-batching against one request at a time, measured in one run.

    python benchmarks/load.py --quick      # under two minutes: benchmarks/results/load-quick.{json,md}
    python benchmarks/load.py              # longer phases: benchmarks/results/load.{json,md}

The server is the real one (`latentrag serve` in a subprocess, uvicorn on 127.0.0.1) on the bundled
models (MiniLM query tower, SmolLM2-135M-Instruct generator), RAG-Token greedy. Its indexes are two
disjoint slices of the bundled Wikipedia leads encoded by the bundled MiniLM document tower (built once
and cached), so every passage id says which index served it. Each phase runs `--clients` closed-loop
clients for `--duration` seconds; halfway through, an admin client swaps the index from 'a' to 'b'.

The phases differ only in `--max-batch`: 1 (one at a time) and `--batch` (micro-batching). Reported per
phase: requests/s, p50/p99 latency, failed requests (must be 0), the mean batch size, and the index check:
every answer's passages belong to the index it reports, answers that finished before the swap began come
from 'a' and answers that started after it ended come from 'b' (violations must be 0). The gain is the
ratio of the two phases' requests/s, measured in the same run. The machine is shared: read the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
TOKEN = "load-benchmark-token"


def build_indexes(root: Path, per_index: int, words: int) -> dict[str, set[str]]:
    """Indexes 'a' and 'b': consecutive disjoint slices of the wiki-leads passages (cached under `root`)."""
    from latentrag.retrieval.corpus import PassageStore, read_corpus, split_passages
    from latentrag.retrieval.encoders import DenseEncoder, freeze
    from latentrag.retrieval.index import MANIFEST, PASSAGES, build_index

    ids: dict[str, set[str]] = {}
    encoder = None
    for n, name in enumerate(("a", "b")):
        directory = root / name
        if not (directory / MANIFEST).exists():
            encoder = encoder or freeze(DenseEncoder.from_pretrained("minilm"))
            passages = []
            for i, p in enumerate(split_passages(read_corpus("wiki-leads"), words=words)):
                if i >= (n + 1) * per_index:
                    break
                if i >= n * per_index:
                    passages.append(p)
            build_index(passages, encoder, directory, progress=False, corpus="wiki-leads", passage_words=words,
                        encoder_source="minilm")
        ids[name] = set(PassageStore(directory / PASSAGES).ids())
    return ids


def questions(root: Path, n: int = 64) -> list[str]:
    from latentrag.retrieval.corpus import PassageStore
    from latentrag.retrieval.index import PASSAGES

    titles = []
    for name in ("a", "b"):
        store = PassageStore(root / name / PASSAGES)
        titles += [store[i].title for i in range(0, len(store), max(1, len(store) // (n // 2)))]
    return [f"What is {t}?" for t in titles]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, max_batch: int, max_wait_ms: float, threads: int):
    port = free_port()
    env = dict(os.environ, LATENTRAG_ADMIN_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "latentrag", "--threads", str(threads), "serve", "--indexes-root", str(root),
           "--index", "a", "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready in 300 s")


async def run_phase(url: str, qs: list[str], clients: int, duration: float, body: dict) -> dict:
    records: list[dict] = []
    swap: dict = {}
    t0 = time.perf_counter()
    end = t0 + duration

    async def client(c: int, http: httpx.AsyncClient) -> None:
        i = c
        while time.perf_counter() < end:
            q = qs[i % len(qs)]
            i += clients
            start = time.perf_counter()
            try:
                r = await http.post("/v1/ask", json={"question": q, **body})
                data = r.json() if r.status_code == 200 else {}
                status = r.status_code
            except httpx.HTTPError as e:
                data, status = {}, f"{type(e).__name__}"
            records.append({"start": start, "end": time.perf_counter(), "status": status,
                            "index": data.get("index", {}).get("name"), "ids": [p["id"] for p in data.get("passages", [])],
                            "batch": data.get("timings", {}).get("batch_size")})

    async def swapper(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(duration / 2)
        swap["start"] = time.perf_counter()
        r = await http.post("/v1/index", json={"name": "b"}, headers={"Authorization": f"Bearer {TOKEN}"})
        swap["end"] = time.perf_counter()
        swap["status"] = r.status_code

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(swapper(http), *(client(c, http) for c in range(clients)))
    return {"records": records, "swap": swap, "elapsed": time.perf_counter() - t0}


def summarise(phase: dict, ids: dict[str, set[str]]) -> dict:
    records, swap = phase["records"], phase["swap"]
    ok = [r for r in records if r["status"] == 200]
    latency = sorted(r["end"] - r["start"] for r in ok)
    wrong_passages = sum(1 for r in ok if not set(r["ids"]) <= ids.get(r["index"], set()))
    before = [r for r in ok if r["end"] < swap["start"]]
    after = [r for r in ok if r["start"] > swap["end"]]
    misplaced = sum(r["index"] != "a" for r in before) + sum(r["index"] != "b" for r in after)
    q = statistics.quantiles(latency, n=100, method="inclusive") if len(latency) > 1 else latency * 99
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "requests_per_s": round(len(ok) / phase["elapsed"], 3),
        "p50_s": round(statistics.median(latency), 3) if latency else None,
        "p99_s": round(q[98], 3) if latency else None,
        "mean_batch": round(statistics.mean(r["batch"] for r in ok), 2) if ok else None,
        "swap_status": swap.get("status"),
        "swap_s": round(swap["end"] - swap["start"], 3),
        "answers_before_swap_from_a": sum(r["index"] == "a" for r in before),
        "answers_after_swap_from_b": sum(r["index"] == "b" for r in after),
        "answers_during_swap": len(ok) - len(before) - len(after),
        "index_violations": wrong_passages + misplaced,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (under two minutes in all)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=None, help="seconds per phase (quick 30, else 120)")
    parser.add_argument("--batch", type=int, default=8, help="max batch of the micro-batching phase")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--passages", type=int, default=None, help="passages per index (quick 300, else 2000)")
    parser.add_argument("--words", type=int, default=60, help="words per passage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    duration = args.duration or (30.0 if args.quick else 120.0)
    per_index = args.passages or (300 if args.quick else 2000)

    import torch

    from latentrag.assets import cache_dir

    torch.set_num_threads(1)
    root = cache_dir() / "bench" / f"load-indexes-{per_index}x{args.words}"
    t = time.perf_counter()
    ids = build_indexes(root, per_index, args.words)
    print(f"indexes a, b of {per_index} passages in {root} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    qs = questions(root)
    body = {"mode": "token", "decoding": "greedy", "k": args.k, "max_new_tokens": args.max_new_tokens}

    phases = {}
    for label, max_batch in (("one_at_a_time", 1), ("micro_batched", args.batch)):
        load_before = os.getloadavg()[0]
        proc, url = start_server(root, max_batch, args.max_wait_ms, args.threads)
        try:
            phase = asyncio.run(run_phase(url, qs, args.clients, duration, body))
        finally:
            proc.terminate()
            proc.wait(30)
        phases[label] = {"max_batch": max_batch, **summarise(phase, ids),
                         "machine_load_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
        print(label, json.dumps(phases[label]), file=sys.stderr)

    gain = phases["micro_batched"]["requests_per_s"] / max(phases["one_at_a_time"]["requests_per_s"], 1e-9)
    result = {
        "command": "python benchmarks/load.py" + (" --quick" if args.quick else ""),
        "settings": {"clients": args.clients, "duration_s": duration, "k": args.k,
                     "max_new_tokens": args.max_new_tokens, "passages_per_index": per_index,
                     "words_per_passage": args.words, "server_threads": args.threads,
                     "max_wait_ms": args.max_wait_ms, "mode": "token/greedy",
                     "models": "MiniLM-L6 query tower, SmolLM2-135M-Instruct"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "phases": phases,
        "batching_gain": round(gain, 2),
        "ok": all(p["failed"] == 0 and p["index_violations"] == 0 and p["swap_status"] == 200
                  for p in phases.values()),
    }
    stem = "load-quick" if args.quick else "load"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render(result))
    print(json.dumps({"batching_gain": result["batching_gain"], "ok": result["ok"],
                      **{k: v["requests_per_s"] for k, v in phases.items()}}))
    return 0 if result["ok"] else 1


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Load on the HTTP service", "",
        f"`{result['command']}` — {s['clients']} concurrent clients on loopback for {s['duration_s']:.0f} s per phase, "
        f"RAG-Token greedy, k = {s['k']}, {s['max_new_tokens']} new tokens at most, {s['models']}; "
        f"server on {s['server_threads']} torch thread(s); index swapped a → b halfway through each phase. "
        f"Machine: {result['machine']['cores']} cores, shared with other jobs (1-minute load average before/after "
        f"each phase: {', '.join(str(p['machine_load_1min']) for p in result['phases'].values())}) — "
        "read the ratio, not the absolute figures.",
        "",
        "| phase | max batch | requests/s | p50 (s) | p99 (s) | failed | mean batch | before swap from a | after swap from b | during swap | index violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, p in result["phases"].items():
        lines.append(f"| {label} | {p['max_batch']} | {p['requests_per_s']} | {p['p50_s']} | {p['p99_s']} | {p['failed']} | "
                     f"{p['mean_batch']} | {p['answers_before_swap_from_a']} | {p['answers_after_swap_from_b']} | "
                     f"{p['answers_during_swap']} | {p['index_violations']} |")
    lines += ["", f"Throughput gain of micro-batching over one at a time: **{result['batching_gain']}×** "
              f"(goal ≥ 2× at 8 clients). All checks passed: {result['ok']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
