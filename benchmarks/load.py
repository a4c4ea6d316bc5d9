"""Load on the HTTP service: N concurrent clients on loopback, an index swap in the middle, and the
throughput of micro-batching against one request at a time, measured in one run.

    python benchmarks/load.py --quick      # under two minutes: benchmarks/results/load-quick.{json,md}
    python benchmarks/load.py              # longer phases: benchmarks/results/load.{json,md}
    python benchmarks/load.py --admission  # admission control: benchmarks/results/load-admission.{json,md}

`--admission` (issue 20): one server at a time (max batch 8, one torch thread), first without limits (the
behaviour before admission control: --max-cost, --max-pending-cost and --request-timeout set out of reach),
then with the default limits. In each phase one client sends the most expensive request the default limits
allow (RAG-Token greedy over k = 50 passages, 64 new tokens: cost 16,000; see `--expensive-*`), and 3 s later `--clients` closed-loop clients send tiny
requests (k = 1, 4 new tokens) for `--duration` s with a 60-s client timeout. Reported per phase: the tiny
requests' p50/p95 latency, how many were answered, refused (429/503, and how fast) or timed out, and the
expensive request's own status and latency.

The server is the real one (`latentrag serve` in a subprocess, uvicorn on 127.0.0.1) on the bundled
models (MiniLM query tower, SmolLM2-135M-Instruct generator), RAG-Token greedy. Its indexes are two
disjoint slices of the bundled Wikipedia leads encoded by the bundled MiniLM document tower (built once
and cached), so every passage id says which index served it.

Two servers run, differing only in `--max-batch`: 1 (one at a time) and `--batch` (micro-batching); they
are loaded in turn, never together, for `--rounds` alternating rounds (so that the shared machine's drift
hits both alike). A round runs `--clients` closed-loop clients for `--duration` seconds, then lets the
requests in flight finish; halfway through it an admin client swaps that server's index (a → b, then
back). Reported per mode: requests/s (answers / seconds over all its rounds), p50/p99 latency, failed
requests (must be 0), the mean batch size, and the index check: every answer's passages belong to the
index it reports, answers that finished before a swap began come from the old index and answers that
started after it ended from the new one (violations must be 0). The gain is the ratio of the two modes'
requests/s, measured in the same run. The machine is shared: read the ratio.
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


def start_server(root: Path, max_batch: int, max_wait_ms: float, threads: int, extra: tuple = ()):
    port = free_port()
    env = dict(os.environ, LATENTRAG_ADMIN_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "latentrag", "--threads", str(threads), "serve", "--indexes-root", str(root),
           "--index", "a", "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
           "--log-level", "warning", *extra]
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


async def run_phase(url: str, qs: list[str], clients: int, duration: float, body: dict, swap_to: str) -> dict:
    """`clients` closed-loop clients for `duration` s (then each finishes its request); a swap halfway."""
    records: list[dict] = []
    swap: dict = {"to": swap_to}
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
        r = await http.post("/v1/index", json={"name": swap_to}, headers={"Authorization": f"Bearer {TOKEN}"})
        swap["end"] = time.perf_counter()
        swap["status"] = r.status_code
        swap["from"] = r.json().get("previous") if r.status_code == 200 else None

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(swapper(http), *(client(c, http) for c in range(clients)))
    return {"records": records, "swap": swap, "elapsed": time.perf_counter() - t0}


def summarise(phases: list[dict], ids: dict[str, set[str]]) -> dict:
    """Throughput = answers / time over all rounds of one mode; the index check per round's swap."""
    ok, failed, elapsed, violations, before_a, after_b, during = [], 0, 0.0, 0, 0, 0, 0
    for phase in phases:
        records, swap = phase["records"], phase["swap"]
        good = [r for r in records if r["status"] == 200]
        ok += good
        failed += len(records) - len(good)
        elapsed += phase["elapsed"]
        violations += sum(1 for r in good if not set(r["ids"]) <= ids.get(r["index"], set()))
        before = [r for r in good if r["end"] < swap["start"]]
        after = [r for r in good if r["start"] > swap["end"]]
        violations += sum(r["index"] != swap["from"] for r in before) + sum(r["index"] != swap["to"] for r in after)
        before_a, after_b = before_a + len(before), after_b + len(after)
        during += len(good) - len(before) - len(after)
    latency = sorted(r["end"] - r["start"] for r in ok)
    q = statistics.quantiles(latency, n=100, method="inclusive") if len(latency) > 1 else latency * 99
    return {
        "requests": len(ok) + failed,
        "failed": failed,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(len(ok) / elapsed, 3),
        "p50_s": round(statistics.median(latency), 3) if latency else None,
        "p99_s": round(q[98], 3) if latency else None,
        "mean_batch": round(statistics.mean(r["batch"] for r in ok), 2) if ok else None,
        "swaps_ok": sum(p["swap"].get("status") == 200 for p in phases),
        "swaps": len(phases),
        "max_swap_s": round(max(p["swap"]["end"] - p["swap"]["start"] for p in phases), 3),
        "answers_before_a_swap_from_the_old_index": before_a,
        "answers_after_a_swap_from_the_new_index": after_b,
        "answers_across_a_swap": during,
        "index_violations": violations,
    }


async def admission_phase(url: str, qs: list[str], clients: int, duration: float, expensive: dict) -> dict:
    """The most expensive allowed request, then tiny closed-loop clients while it runs."""
    tiny = {"mode": "token", "decoding": "greedy", "k": 1, "max_new_tokens": 4}
    records: list[dict] = []
    big: dict = {}
    t0 = time.perf_counter()

    async def heavy(http: httpx.AsyncClient) -> None:
        start = time.perf_counter()
        try:
            r = await http.post("/v1/ask", json={"question": qs[0], **expensive}, timeout=900)
            big["status"] = r.status_code
        except httpx.HTTPError as e:
            big["status"] = type(e).__name__
        big["end"] = time.perf_counter()
        big["seconds"] = round(big["end"] - start, 2)

    async def client(c: int, http: httpx.AsyncClient, end: float) -> None:
        i = c
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:
                r = await http.post("/v1/ask", json={"question": qs[1 + i % (len(qs) - 1)], **tiny}, timeout=60)
                status = r.status_code
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.HTTPError as e:
                status = type(e).__name__
            i += clients
            records.append({"status": status, "seconds": time.perf_counter() - start, "start": start})
            if status in (429, 503):
                await asyncio.sleep(0.2)  # a polite client: refused, it tries again a little later

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=clients + 2)) as http:
        task = asyncio.ensure_future(heavy(http))
        await asyncio.sleep(3.0)
        running = "status" not in big
        end = time.perf_counter() + duration
        await asyncio.gather(*(client(c, http, end) for c in range(clients)))
        tiny_done = time.perf_counter() - t0
        await task
    def summary(rows: list[dict]) -> dict:
        latency = sorted(r["seconds"] for r in rows)
        refused = [r for r in rows if r["status"] in (429, 503)]

        def pct(q):
            return (round(statistics.quantiles(latency, n=100, method="inclusive")[q - 1], 3)
                    if len(latency) > 1 else (round(latency[0], 3) if latency else None))

        return {"tiny_requests": len(rows), "answered": sum(r["status"] == 200 for r in rows),
                "refused_429_503": len(refused), "timed_out_60s": sum(r["status"] == "timeout" for r in rows),
                "other": sum(r["status"] not in (200, 429, 503, "timeout") for r in rows),
                "p50_s": pct(50), "p95_s": pct(95),
                "max_refusal_s": round(max((r["seconds"] for r in refused), default=0.0), 3)}

    big_end = big.pop("end", float("inf"))
    return {"while_expensive_ran": summary([r for r in records if r["start"] < big_end]),
            "after_it_ended": summary([r for r in records if r["start"] >= big_end]),
            "all": summary(records),
            "expensive_running_when_tiny_started": running, "expensive": big,
            "tiny_phase_s": round(tiny_done, 1)}


def admission(args, root: Path, qs: list[str]) -> int:
    import torch

    from latentrag.serving.admission import Limits, request_cost

    greedy = args.expensive_decoding == "greedy"
    expensive = {"mode": "token" if args.expensive_decoding in ("greedy", "beam") else "sequence",
                 "decoding": args.expensive_decoding, "k": args.expensive_k, "max_new_tokens": args.expensive_tokens}
    if not greedy:
        expensive["num_beams"] = args.expensive_beams
    cost = request_cost(args.expensive_decoding, args.expensive_k, None if greedy else args.expensive_beams,
                        args.expensive_tokens)
    limits = Limits()
    off = ("--max-cost", "1000000000", "--max-pending-cost", "1000000000", "--max-queue", "1000000",
           "--request-timeout", "100000")
    phases, loads = {}, []
    for label, extra in (("before: no limits", off), ("after: default limits", ())):
        proc, url = start_server(root, args.batch, args.max_wait_ms, args.threads, extra)
        try:
            loads.append(os.getloadavg())
            phases[label] = asyncio.run(admission_phase(url, qs, args.clients, args.duration or 30.0, expensive))
            loads.append(os.getloadavg())
        finally:
            t = time.perf_counter()
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            phases[label]["sigterm_exit_s"] = round(time.perf_counter() - t, 2)
        print(f"{label}: {json.dumps(phases[label])}", file=sys.stderr)
    result = {
        "command": "python benchmarks/load.py --admission" + (f" --duration {args.duration:g}" if args.duration else ""),
        "expensive_request": {**expensive, "cost": cost},
        "limits": {"max_cost": limits.max_cost, "max_pending_cost": limits.max_pending_cost,
                   "max_queue": limits.max_queue, "timeout_s": limits.timeout_s},
        "settings": {"clients": args.clients, "duration_s": args.duration or 30.0, "server_threads": args.threads,
                     "max_batch": args.batch, "models": "the shipped trained default (MiniLM query tower + LoRA, "
                     "SmolLM2-135M-Instruct + LoRA)", "passages_per_index": args.passages or 300},
        "machine": {"cores": os.cpu_count(), "load_average_1_5_15": [[round(x, 2) for x in a] for a in loads],
                    "torch": torch.__version__},
        "phases": phases,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load-admission.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "load-admission.md").write_text(render_admission(result))
    during = phases["after: default limits"]["while_expensive_ran"]
    ok = during["tiny_requests"] > 0 and during["timed_out_60s"] == 0 and during["other"] == 0 and (
        (during["p95_s"] or 0) <= 2.0 or (during["answered"] == 0 and during["max_refusal_s"] <= 2.0))
    print(json.dumps({"ok": ok, **{k: {"while_expensive_ran": v["while_expensive_ran"]} for k, v in phases.items()}}))
    return 0 if ok else 1


def render_admission(result: dict) -> str:
    e, s, m = result["expensive_request"], result["settings"], result["machine"]
    lines = [
        "# Admission control under an expensive request", "",
        f"`{result['command']}` — one server at a time ({s['models']}, {s['server_threads']} torch thread, max batch "
        f"{s['max_batch']}). The most expensive request the default limits allow ({e['mode']}/{e['decoding']}, "
        f"k = {e['k']}, {e.get('num_beams', 1)} beam(s), {e['max_new_tokens']} new tokens: cost {e['cost']} of --max-cost "
        f"{result['limits']['max_cost']}) is sent first; 3 s later {s['clients']} closed-loop clients send tiny "
        f"requests (k = 1, 4 new tokens) for {s['duration_s']:g} s (60-s client timeout; a refused client waits "
        f"0.2 s). Machine: {m['cores']} cores shared with a training run (load average 1/5/15 min at the start and "
        f"end of each phase: {m['load_average_1_5_15']}).", "",
        "| phase | tiny requests sent | answered | refused (429/503) | slowest refusal (s) | timed out (60 s) | "
        "p50 (s) | p95 (s) | expensive request | SIGTERM to exit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, phase in result["phases"].items():
        for part in ("while_expensive_ran", "after_it_ended"):
            p = phase[part]
            lines.append(f"| {label}, {part.replace('_', ' ')} | {p['tiny_requests']} | {p['answered']} | "
                         f"{p['refused_429_503']} | {p['max_refusal_s']} | {p['timed_out_60s']} | {p['p50_s']} | "
                         f"{p['p95_s']} | {phase['expensive'].get('status')} in {phase['expensive'].get('seconds')} s"
                         f" | {phase['sigterm_exit_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (under two minutes in all)")
    parser.add_argument("--admission", action="store_true", help="admission control before/after (see above)")
    parser.add_argument("--expensive-decoding", default="greedy", help="greedy | beam | thorough | fast")
    parser.add_argument("--expensive-k", type=int, default=50)
    parser.add_argument("--expensive-beams", type=int, default=4)
    parser.add_argument("--expensive-tokens", type=int, default=64)  # greedy, k = 50: cost 16,000 = the default bound
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=None, help="seconds per phase (quick 20, else 60)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of both modes (quick 2, else 4)")
    parser.add_argument("--batch", type=int, default=8, help="max batch of the micro-batching phase")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--passages", type=int, default=None, help="passages per index (quick 300, else 2000)")
    parser.add_argument("--words", type=int, default=60, help="words per passage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    duration = args.duration or (20.0 if args.quick else 60.0)
    rounds = args.rounds or (2 if args.quick else 4)
    per_index = args.passages or (300 if args.quick else 2000)

    import torch

    from latentrag.assets import cache_dir

    torch.set_num_threads(1)
    root = cache_dir() / "bench" / f"load-indexes-{per_index}x{args.words}"
    t = time.perf_counter()
    ids = build_indexes(root, per_index, args.words)
    print(f"indexes a, b of {per_index} passages in {root} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    qs = questions(root)
    if args.admission:
        return admission(args, root, qs)
    body = {"mode": "token", "decoding": "greedy", "k": args.k, "max_new_tokens": args.max_new_tokens}

    modes = {"one_at_a_time": 1, "micro_batched": args.batch}
    servers = {label: start_server(root, max_batch, args.max_wait_ms, args.threads) for label, max_batch in modes.items()}
    runs: dict[str, list[dict]] = {label: [] for label in modes}
    current = {label: "a" for label in modes}
    loads = []
    try:
        for r in range(rounds):  # alternate the modes so that the machine's drift hits both alike
            for label in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                target = "b" if current[label] == "a" else "a"
                loads.append(os.getloadavg()[0])
                phase = asyncio.run(run_phase(servers[label][1], qs, args.clients, duration, body, target))
                current[label] = target
                runs[label].append(phase)
                print(f"round {r} {label}: {len(phase['records'])} answers in {phase['elapsed']:.1f} s", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    phases = {label: {"max_batch": modes[label], **summarise(runs[label], ids)} for label in modes}
    loads.append(os.getloadavg()[0])

    gain = phases["micro_batched"]["requests_per_s"] / max(phases["one_at_a_time"]["requests_per_s"], 1e-9)
    result = {
        "command": "python benchmarks/load.py" + (" --quick" if args.quick else ""),
        "settings": {"clients": args.clients, "duration_s": duration, "rounds": rounds, "k": args.k,
                     "max_new_tokens": args.max_new_tokens, "passages_per_index": per_index,
                     "words_per_passage": args.words, "server_threads": args.threads,
                     "max_wait_ms": args.max_wait_ms, "mode": "token/greedy",
                     "models": "MiniLM-L6 query tower, SmolLM2-135M-Instruct"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_1min": [round(x, 1) for x in loads],
                    "python": platform.python_version(), "torch": torch.__version__},
        "phases": phases,
        "batching_gain": round(gain, 2),
        "ok": all(p["failed"] == 0 and p["index_violations"] == 0 and p["swaps_ok"] == p["swaps"]
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
    s, m = result["settings"], result["machine"]
    lines = [
        "# Load on the HTTP service", "",
        f"`{result['command']}` — {s['clients']} concurrent clients on loopback, {s['rounds']} alternating rounds of "
        f"{s['duration_s']:.0f} s per mode (then in-flight requests finish), RAG-Token greedy, k = {s['k']}, "
        f"{s['max_new_tokens']} new tokens at most, {s['models']}; server on {s['server_threads']} torch thread(s); "
        "the index is swapped (a ↔ b) halfway through every round. "
        f"Machine: {m['cores']} cores shared with other jobs (1-minute load average at each phase start: "
        f"{m['load_average_1min']}) — read the ratio, not the absolute figures.",
        "",
        "| mode | max batch | answers | seconds | requests/s | p50 (s) | p99 (s) | failed | mean batch | swaps ok | "
        "before a swap: old index | after a swap: new index | across a swap | index violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, p in result["phases"].items():
        lines.append(
            f"| {label} | {p['max_batch']} | {p['requests'] - p['failed']} | {p['seconds']} | {p['requests_per_s']} | "
            f"{p['p50_s']} | {p['p99_s']} | {p['failed']} | {p['mean_batch']} | {p['swaps_ok']}/{p['swaps']} | "
            f"{p['answers_before_a_swap_from_the_old_index']} | {p['answers_after_a_swap_from_the_new_index']} | "
            f"{p['answers_across_a_swap']} | {p['index_violations']} |")
    lines += ["", f"Throughput gain of micro-batching over one at a time: **{result['batching_gain']}×** "
              f"(goal ≥ 2× at 8 clients). No failures, no index violations, every swap answered 200: {result['ok']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
