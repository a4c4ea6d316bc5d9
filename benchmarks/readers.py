"""Kinds of reader side by side: RAG-Sequence, RAG-Token, concatenation and Fusion-in-Decoder on the same
retriever, questions, seed and k — what each costs, and (with `training_claims.py`) what each scores.

    python benchmarks/readers.py costs --threads 1     # default models (SmolLM2 + MiniLM), few steps: minutes
    python benchmarks/readers.py tiny --threads 1      # all four kinds on a tiny random BART (FiD's only numbers)
    python benchmarks/readers.py report                # benchmarks/results/readers.md from readers.json
    python benchmarks/readers.py commands              # the expensive rows' commands (training, EM, the swap)

Costs, per kind and k (3 and 10), each measured in a fresh subprocess (so the peak memory is that cell's
alone) and saved to benchmarks/results/readers.json as soon as it is done (a re-run skips finished cells;
--force redoes them):
  * one training step of --batch-size questions (4; the default-model cells here ran 1, see the tables)
    (LoRA r = 16 on the generator, and on the query tower for the RAG kinds,
    which is frozen for concat/fid as `latentrag train` does): seconds per step (median of --steps after
    one untimed step), the process's peak resident memory above the loaded model (ru_maxrss − RSS after
    loading), and the activations saved for backward (distinct tensor storages, a figure the machine's load
    does not change);
  * answer latency: one question at a time, ≤ 32 tokens, greedy (RAG-Sequence: thorough with one beam per
    passage, as training_claims.py evaluates it), --questions questions after one untimed.
The concatenated input holds k passages: its budget is raised to 256·k tokens here (`--max-input-length`
for concat in the training and evaluation rows too), so that k = 10 reads ten passages, not the first
four; the tokens it reads are reported.

FiD needs a seq2seq generator and none ships offline, so FiD is measured on a tiny random BART only (with
the three other kinds beside it, for scale): those numbers say how the kinds' costs compare, nothing
about accuracy. The machine's load average is recorded with every cell: timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "readers.json"
KS = (3, 10)
BATCH = 4
CONCAT_TOKENS_PER_PASSAGE = 256  # concat's input budget per passage read (SmolLM2 reads 8,192 tokens)
MODES = {"default": ("token", "sequence", "concat"), "tiny": ("token", "sequence", "concat", "fid")}
# trivia-style questions with short answers: the cost cells need no data set download
QA = [
    ("Who wrote the play Hamlet?", "William Shakespeare"), ("What is the capital of France?", "Paris"),
    ("Which river flows through Cairo?", "Nile"), ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the largest planet in the Solar System?", "Jupiter"), ("Who composed the Moonlight Sonata?", "Beethoven"),
    ("In which country is Machu Picchu?", "Peru"), ("What is the chemical symbol for gold?", "Au"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"), ("What is the tallest mountain on Earth?",
                                                                           "Mount Everest"),
    ("Which city hosted the 2012 Summer Olympics?", "London"), ("Who discovered penicillin?", "Alexander Fleming"),
    ("What language is spoken in Brazil?", "Portuguese"), ("Who wrote Pride and Prejudice?", "Jane Austen"),
    ("What is the currency of Japan?", "yen"), ("Which element has atomic number 1?", "hydrogen"),
]

# ---- the expensive rows (run them when the CPU is free) -------------------------------------------------
SWAP_ROWS = {  # knowledge swap (paper §4.5) of the compared rows trained by training_claims.py, at equal steps
    "token": ["--model", "runs/claims/token/model"],
    "concat": ["--model", "runs/claims/concat/model"],
}


def swap_command(row: str, threads: int) -> list[str]:
    return ["python", "benchmarks/knowledge_swap.py", *SWAP_ROWS[row], "--limit", "300",
            "--threads", str(threads), "--out", f"benchmarks/results/knowledge-swap-{row}"]


def expensive_commands(threads: int) -> list[str]:
    """Train and evaluate the concat row beside the token and sequence rows (training_claims.py), then the
    knowledge swap of the token and concat rows."""
    lines = ["# train and evaluate the token, sequence and concat rows (60 steps each, same data/seed/k; resumable)",
             f"python benchmarks/training_claims.py run --rows token sequence concat --threads {threads}"]
    lines += ["# the knowledge swap of the trained token and concat rows (300 answerable questions per data set)"]
    lines += [shlex.join(swap_command(row, threads)) for row in SWAP_ROWS]
    lines += ["# the tables", "python benchmarks/readers.py report", "python benchmarks/training_claims.py report"]
    return lines


# ---- one cell, in its own process ------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _default_model(mode: str, k: int, train: bool):
    import torch

    from latentrag.training.trainer import TrainSettings, _resolve_index, build_model

    settings = TrainSettings(train="-", out="-", mode=mode, k=k, lora_rank=16,
                             max_input_length=CONCAT_TOKENS_PER_PASSAGE * k if mode == "concat" else None)
    model = build_model(settings, _resolve_index(None), torch.device("cpu"))
    return model if train else model.eval()


def _tiny_model(mode: str, k: int, train: bool):
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_dense_encoder, tiny_passages, tiny_seq2seq_generator

    from latentrag.adapters import add_lora
    from latentrag.model import RagConfig, RagModel
    from latentrag.rag_types import rag_type
    from latentrag.retrieval.index import build_index
    from latentrag.retrieval.retriever import Retriever

    document = tiny_dense_encoder("dpr-context", seed=2)
    index = build_index(tiny_passages(), document, Path(tempfile.mkdtemp()) / "index", progress=False)
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), document.identity(), index)
    budget = 128 * k if mode == "concat" else 128
    generator = tiny_seq2seq_generator(seed=3, max_input_length=budget, max_position_embeddings=2048)
    model = RagModel(retriever, generator, RagConfig(mode=mode, k=k))
    model.requires_grad_(False)
    if train:
        add_lora(model.generator.model, 4)
        if rag_type(mode).latent:
            add_lora(model.retriever.query_encoder.model, 4)
    return model


def _saved_for_backward(model, questions, answers) -> float:
    """MB of distinct tensor storages autograd keeps for the backward pass of one loss."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(questions, answers)
    loss.backward()
    return sum(seen.values()) / 2**20


def cell(models: str, mode: str, k: int, what: str, steps: int, questions: int, batch_size: int) -> dict:
    import torch

    from latentrag.rag_types import rag_type
    from latentrag.training.trainer import _train_mode

    with contextlib.suppress(OSError):  # out of memory on a shared machine, the kernel ends this cell first
        Path("/proc/self/oom_score_adj").write_text("1000")
    torch.manual_seed(0)
    build = _default_model if models == "default" else _tiny_model
    model = build(mode, k, what == "train")
    generator = model.generator
    qa = QA * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retrieved = model.retrieve([q for q, _ in qa[:8]], k)
        batch = rag_type(mode).prepare(generator, retrieved.questions, retrieved.passages)
    tokens = batch.attention_mask.sum(-1).float()
    out = {"input_rows_per_question": batch.input_ids.shape[0] // len(retrieved.questions),
           "input_tokens_per_question": float(tokens.sum()) / len(retrieved.questions),
           "inputs_cut": sum("exceed max_input_length" in str(w.message) for w in caught),
           "max_input_length": generator.max_input_length}
    baseline = _rss_mb()
    if what == "train":
        _train_mode(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=3e-4)
        times, saved = [], []
        for step in range(steps + 1):
            chunk = qa[step * batch_size : (step + 1) * batch_size]
            start = time.perf_counter()
            saved.append(_saved_for_backward(model, [q for q, _ in chunk], [a for _, a in chunk]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - start)
        out["step_s"] = statistics.median(times)
        out["peak_mb_above_model"] = _peak_mb() - baseline
        out["saved_for_backward_mb"] = max(saved)
        out["batch_size"] = batch_size
        out["trainable_parameters"] = sum(p.numel() for p in trainable)
        out["query_tower_trains"] = any(p.requires_grad for p in model.retriever.query_encoder.parameters())
    else:
        times = []
        with torch.inference_mode():
            for i in range(questions + 1):
                start = time.perf_counter()
                model.generate(qa[i][0], mode=mode, k=k, num_beams=1,  # RAG-Sequence: thorough, one beam per passage
                               decoding="thorough" if mode == "sequence" else "greedy")
                if i:
                    times.append(time.perf_counter() - start)
        out["latency_s_median"] = statistics.median(times)
        out["latency_s_mean"] = statistics.mean(times)
        out["peak_mb_above_model"] = _peak_mb() - baseline
    out["questions" if what == "answer" else "steps"] = questions if what == "answer" else steps
    out["load_average"] = os.getloadavg()
    out["threads"] = torch.get_num_threads()
    return out


# ---- driving the cells -------------------------------------------------------------------------------------
def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {"cells": {}}


def _save(data: dict) -> None:
    from latentrag.atomic import atomic_write_text

    atomic_write_text(OUT, json.dumps(data, indent=2))


def measure(models: str, threads: int, steps: int, questions: int, batch_size: int, force: bool,
            modes: list[str] | None, ks: list[int], whats: list[str]) -> None:
    data = _load()
    for mode in modes or MODES[models]:
        for k in ks:
            for what in whats:
                key = f"{models}/{mode}/k{k}/{what}"
                if key in data["cells"] and not force:
                    continue
                command = [sys.executable, str(Path(__file__).resolve()), "cell", "--models", models, "--mode", mode,
                           "--k", str(k), "--what", what, "--steps", str(steps), "--questions", str(questions),
                           "--batch-size", str(batch_size),
                           "--threads", str(threads)]
                print("+ " + shlex.join(["nice", "-n", "19", *command[1:]]), file=sys.stderr, flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
                done = subprocess.run(["nice", "-n", "19", *command], env=env, capture_output=True, text=True)
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"cell {key} failed")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["command"] = "nice -n 19 python benchmarks/readers.py " + shlex.join(command[2:])
                data = _load()
                data["cells"][key] = result
                _save(data)
                print(f"  {key}: {json.dumps({k_: v for k_, v in result.items() if k_ != 'command'})}",
                      file=sys.stderr, flush=True)


# ---- the report ----------------------------------------------------------------------------------------------
TITLES = {"sequence": "RAG-Sequence", "token": "RAG-Token", "concat": "Concatenation", "fid": "Fusion-in-Decoder"}
CHOOSING = """\
**Which to choose.** Take **RAG-Token** (or RAG-Sequence) when you need to know *which passage an answer came
from* (the posterior p(z|x,y) is computed, not guessed), when you will fine-tune the retriever on
question–answer pairs alone (only the latent-variable kinds give the query tower a gradient), or when the
generator's context is short: each passage is read on its own, so k passages cost k short inputs and none
is cut for lack of room. Take **concatenation** when the generator is a decoder-only chat model with a long
context and the answer needs facts from several passages at once (a RAG kind reads one passage per answer
or per token and cannot join two); it trains only the generator (keep the retriever you have), its cost
grows with the total length of the k passages, and it gives no provenance beyond the retriever's ranking.
Take **Fusion-in-Decoder** in the same situation with a seq2seq generator (BART, T5): each passage is encoded
apart (cost linear in k, no passage cut by another), one decoder joins them; it is what beat RAG at large k
in Izacard & Grave (2021), and it too leaves the retriever untrained and gives no posterior. Measure on your
data before choosing: the rows above are one small generator on one small index."""


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def cost_table(data: dict, models: str) -> list[str]:
    cells = data["cells"]
    lines = ["| kind | k | inputs × tokens per question | step s (questions) | peak MB above model (train) | saved for backward MB | "
             "answer latency s (median) | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES[models]:
        for k in KS:
            t, a = cells.get(f"{models}/{mode}/k{k}/train"), cells.get(f"{models}/{mode}/k{k}/answer")
            if t is None and a is None:
                lines.append(f"| {TITLES[mode]} | {k} | not run | | | | | |")
                continue
            ref = t or a
            shape = f"{ref['input_rows_per_question']} × {ref['input_tokens_per_question'] / ref['input_rows_per_question']:.0f}"
            if ref.get("inputs_cut"):
                shape += " (cut)"
            loads = sorted({f"{c['load_average'][0]:.1f}" for c in (t, a) if c})
            step = "–" if t is None else f"{t['step_s']:.2f} ({t.get('batch_size', BATCH)})"
            lines.append(f"| {TITLES[mode]} | {k} | {shape} | {step} | "
                         f"{_fmt(t and t['peak_mb_above_model'], '.0f')} | {_fmt(t and t['saved_for_backward_mb'], '.1f')} | "
                         f"{_fmt(a and a['latency_s_median'], '.3f')} | {'/'.join(loads)} |")
    return lines


def section(threads: int = 1) -> list[str]:
    """The side-by-side section of training.md (costs from readers.json; EM rows are training_claims' own)."""
    data = _load()
    lines = ["## Kinds of reader side by side", "",
             "The same retriever, questions, seed and k for every kind. Accuracy: the `token`, `sequence` and "
             "`concat` rows of the tables in training.md (60 steps each, same data, order, seed and k = 3; concat "
             "trains the generator alone: no gradient reaches the query tower through the concatenated input, so "
             "compare it with the frozen-query row too). How each kind reads its passages: "
             "[docs/decoding.md](../../docs/decoding.md).", ""]
    for models, what in (("default", "SmolLM2-135M-Instruct + MiniLM, LoRA r = 16, one thread, niced; the step's "
                                     "batch in parentheses (1 here: RAG at k = 10 and 4 questions would need about 4× the peak shown)"),
                         ("tiny", "a tiny random BART (FiD needs seq2seq; none ships offline), LoRA r = 4, batch 4")):
        if not any(key.startswith(models + "/") for key in data["cells"]):
            continue
        lines += [f"Costs, {what}, CPU (`python benchmarks/readers.py {'costs' if models == 'default' else 'tiny'}`):", ""]
        lines += cost_table(data, models) + [""]
        if models == "default":
            lines += ["Read it as: at equal k, concatenation holds fewer tokens than RAG's k rows (one prompt, not k "
                      "copies of it) and keeps ~25–50 % less for backward; its attention grows with the square of "
                      "the joined length, RAG's with k. RAG-Sequence's answers cost most (a search under every "
                      "passage, then re-scoring). Timings are one step or three answers on a shared CPU: the load "
                      "average is beside each; the saved-for-backward column does not depend on it.", ""]
    for row in SWAP_ROWS:
        path = RESULTS / f"knowledge-swap-{row}.json"
        if path.is_file():
            o = json.loads(path.read_text())["overall"]
            low, high = o["follows"]["ci95"]
            lines.append(f"- knowledge swap, {row} row: {100 * o['follows']['rate']:.1f} % [{100 * low:.1f}, "
                         f"{100 * high:.1f}] of {o['n']} answers follow the swapped index.")
        else:
            lines.append(f"- knowledge swap, {row} row: not run (`{shlex.join(swap_command(row, threads))}`).")
    lines += ["", CHOOSING, "", "Commands for the expensive rows:", "", "```", *expensive_commands(threads), "```", ""]
    return lines


def report(threads: int) -> str:
    data = _load()
    cells = data["cells"].values()
    lines = ["# Kinds of reader: costs", "", __doc__.split("\n\n", 2)[2].strip(), ""] + section(threads)
    lines += ["Every cell's command:", "", "```", *sorted({c["command"] for c in cells}), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["costs", "tiny", "report", "commands", "cell"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per cell (after one untimed)")
    parser.add_argument("--questions", type=int, default=5, help="timed answers per cell (after one untimed)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="questions per training step")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(TITLES))
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS))
    parser.add_argument("--force", action="store_true", help="measure finished cells again")
    parser.add_argument("--models", choices=list(MODES), default="default")  # cell only
    parser.add_argument("--mode", choices=list(TITLES))
    parser.add_argument("--k", type=int)
    parser.add_argument("--what", nargs="+", choices=["train", "answer"], help="default: both")
    args = parser.parse_args(argv)
    if args.action == "cell":
        import torch

        from latentrag.cli import _quiet_transformers
        from latentrag.threads import configure_threads

        configure_threads(args.threads)
        torch.set_num_threads(args.threads)
        _quiet_transformers()
        print(json.dumps(cell(args.models, args.mode, args.k, args.what[0], args.steps, args.questions, args.batch_size)))
        return 0
    if args.action == "commands":
        print("\n".join(expensive_commands(args.threads)))
        return 0
    if args.action in ("costs", "tiny"):
        measure("default" if args.action == "costs" else "tiny", args.threads, args.steps, args.questions,
                args.batch_size, args.force, args.modes, args.ks, args.what or ["train", "answer"])
    from latentrag.atomic import atomic_write_text

    atomic_write_text(RESULTS / "readers.md", report(args.threads))
    print(f"wrote {RESULTS / 'readers.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
