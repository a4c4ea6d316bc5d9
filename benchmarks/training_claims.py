"""The paper's claims about trained models, measured on our data: writes benchmarks/results/training.md.

    python benchmarks/training_claims.py run --threads 2     # trains and evaluates whatever is missing (resumable)
    python benchmarks/training_claims.py report              # the table, from the finished runs
    python benchmarks/training_claims.py commands            # every row's commands, to run them yourself

Rows (each one a `latentrag train` run and `latentrag eval` runs, or an evaluation of a shipped model):
zero-shot RAG (the bundled models untrained), the shipped default (`make train-default`), and the compared
rows — fine-tuned RAG-Token, RAG-Sequence, concatenation (all k passages in one prompt, no latent variable,
query tower frozen), closed-book, RAG-Token with the query tower frozen, RAG-Token with the retrieval scale
fixed at 1 — which all train on the same answerable nq-dev + trivia-dev questions,
in the same order (seed 0), for the same steps, with the same batch, k and LoRA rank. Each is evaluated
on the first N answerable questions of nq-test and trivia-test (the same questions for every row).

Scores are exact match, F1 and answer containment with 95 % percentile-bootstrap intervals over the
questions (`latentrag.evaluation.metrics.bootstrap_interval`), and answer recall@5 of the row's query
tower (closed-book has none). Runs go to runs/claims/ and eval-runs/claims/ (both resumable: a finished
step is skipped, an interrupted one continues).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS, EVALS = Path("runs/claims"), Path("eval-runs/claims")
DATASETS = ("trivia-test", "nq-test")
STEPS = 60  # the compared rows' schedule (the shipped default trains 300 steps: its own row)
COMPARED = ["--train", "nq-dev,trivia-dev", "--answerable-only", "--k", "3", "--steps", str(STEPS),
            "--batch-size", "4", "--lora-rank", "16", "--val-questions", "20", "--eval-every", str(STEPS),
            "--save-every", "20", "--seed", "0", "--target", "first"]  # trained before --target stated existed
LEARNED_SCALE = ["--retrieval-scale", "20", "--learn-retrieval-scale"]
# `make train-default`'s schedule (Makefile TRAIN_DEFAULT) without its mode and scale: for the closed-book
# run that the shipped default is compared with
DEFAULT_SCHEDULE = ["--train", "nq-dev,trivia-dev", "--answerable-only", "--k", "3", "--steps", "300",
                    "--batch-size", "4", "--lora-rank", "16", "--val-questions", "50", "--eval-every", "100",
                    "--save-every", "25", "--seed", "0", "--target", "first"]


@dataclass
class Row:
    name: str
    what: str
    train: list[str] | None = None  # `latentrag train` options beyond COMPARED; None: nothing to train
    model: str | None = None  # eval --model; None with train: the run's model/
    questions: int = 300  # answerable questions per data set
    eval_options: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=lambda: COMPARED)  # the `latentrag train` options all rows share

    def model_path(self) -> str | None:
        return str(RUNS / self.name / "model") if self.train is not None else self.model

    def train_command(self, threads: int) -> list[str] | None:
        if self.train is None:
            return None
        return ["latentrag", "--threads", str(threads), "train", *self.schedule, *self.train,
                "--out", str(RUNS / self.name), "--resume", "--quiet"]

    def eval_dir(self, dataset: str) -> Path:
        return EVALS / f"{self.name}-{dataset.removesuffix('-test')}"

    def eval_command(self, dataset: str, threads: int) -> list[str]:
        model = self.model_path()
        return ["latentrag", "--threads", str(threads), "eval", "--dataset", dataset, "--answerable-only",
                "--limit", str(self.questions), *(["--model", model] if model else []), *self.eval_options,
                "--out", str(self.eval_dir(dataset)), "--resume"]


ROWS = [
    Row("zero-shot", "zero-shot RAG-Token: the bundled models untrained (today's baseline before training)",
        model="base", eval_options=["--k", "3"]),
    Row("default", "the shipped default (`make train-default`: RAG-Token, 300 steps, reading filter + counterfactuals, "
        "s at its own rate, bf16; the previous recipe's figures: benchmarks/reading.py)", questions=500),
    Row("token", f"fine-tuned RAG-Token ({STEPS} steps, scale learned from 20)", train=["--mode", "token", *LEARNED_SCALE]),
    Row("sequence", f"fine-tuned RAG-Sequence ({STEPS} steps, scale learned from 20; thorough decoding, 1 beam)",
        train=["--mode", "sequence", *LEARNED_SCALE], eval_options=["--decoding", "thorough", "--beams", "1"]),
    Row("concat", f"fine-tuned concatenation ({STEPS} steps; the k passages in one prompt of ≤ 768 tokens, no latent "
        "variable: the query tower gets no gradient and stays frozen)",
        train=["--mode", "concat", "--max-input-length", "768"]),
    Row("closed-book", f"fine-tuned closed-book ({STEPS} steps: the same generator, data and steps, no retrieval)",
        train=["--closed-book"], eval_options=["--closed-book"]),
    Row("closed-book-300", "fine-tuned closed-book, 300 steps (the shipped default's data and schedule, no retrieval)",
        train=["--closed-book"], eval_options=["--closed-book"], questions=500, schedule=DEFAULT_SCHEDULE),
    Row("frozen-query", f"fine-tuned RAG-Token, query tower frozen ({STEPS} steps; the paper's frozen retriever)",
        train=["--mode", "token", *LEARNED_SCALE, "--freeze-query-encoder"]),
    Row("scale-1", f"fine-tuned RAG-Token, retrieval scale fixed at 1 ({STEPS} steps; the paper's s)",
        train=["--mode", "token", "--retrieval-scale", "1"]),
]


def _done_training(row: Row) -> bool:
    return (ROOT / RUNS / row.name / "model" / "rag_config.json").is_file()


def _done_eval(row: Row, dataset: str) -> bool:
    return (ROOT / row.eval_dir(dataset) / "metrics.json").is_file()


def run(rows: list[Row], threads: int) -> None:
    for row in rows:
        steps = [] if _done_training(row) else [row.train_command(threads)]
        steps += [row.eval_command(d, threads) for d in DATASETS if not _done_eval(row, d)]
        for command in filter(None, steps):
            print("+ " + shlex.join(command), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)


# ---- the report ---------------------------------------------------------------------------------------
def _records(row: Row, dataset: str) -> list[dict] | None:
    """The per-question predictions of a finished evaluation (None while it is not finished)."""
    folder = ROOT / row.eval_dir(dataset)
    if not (folder / "metrics.json").is_file():
        return None
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]


def _scores(row: Row, dataset: str) -> dict | None:
    from latentrag.evaluation.metrics import bootstrap_interval

    records = _records(row, dataset)
    if records is None:
        return None
    out = {"n": len(records)}
    for key, field_name in (("em", "correct"), ("f1", "f1"), ("contained", "answer_contained")):
        values = [r[field_name] for r in records]
        out[key] = (sum(values) / len(values), *bootstrap_interval(values))
    if records and records[0].get("retrieved"):
        for k in (3, 5):
            hits = [float(any(p["has_answer"] for p in r["retrieved"][:k])) for r in records]
            out[f"recall@{k}"] = (sum(hits) / len(hits), *bootstrap_interval(hits))
    return out


def _paired_recall_gain(before: Row, after: Row, dataset: str, k: int = 5) -> tuple[float, float, float, int] | None:
    """recall@k after − before on the questions both rows answered (paired by id), with its 95 % interval."""
    from latentrag.evaluation.metrics import bootstrap_interval

    def hits(row: Row) -> dict[str, float] | None:
        records = _records(row, dataset)
        return None if records is None else {r["id"]: float(any(p["has_answer"] for p in r["retrieved"][:k]))
                                             for r in records}

    a, b = hits(before), hits(after)
    if a is None or b is None:
        return None
    common = [i for i in a if i in b]
    diffs = [b[i] - a[i] for i in common]
    return (sum(diffs) / len(diffs), *bootstrap_interval(diffs), len(common))


def _cell(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "–"
    mean, low, high = value
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _scale(row: Row) -> str:
    path = ROOT / (row.model_path() or "src/latentrag/default_model") / "rag_config.json"
    if "--closed-book" in (row.train or []):
        return "– (no retrieval)"
    if "concat" in (row.train or []):
        return "– (not in the loss)"
    if row.model == "base" or not path.is_file():
        return "1 (untrained)" if row.model == "base" else "–"
    config = json.loads(path.read_text())
    return f"{config['retrieval_scale']:.2f}" + (" (learned)" if config.get("learn_retrieval_scale") else " (fixed)")


def _answerable(rows: list[Row]) -> str:
    counts = []
    for dataset in DATASETS:
        for r in rows:
            run_file = ROOT / r.eval_dir(dataset) / "run.json"
            if run_file.is_file():
                data = json.loads(run_file.read_text())["data"]
                counts.append(f"{data['answerable_questions']:,} of {data['total_questions']:,} {dataset} questions")
                break
    return ": " + " and ".join(counts) if counts else ""


def report(rows: list[Row], threads: int) -> str:
    scores = {(r.name, d): _scores(r, d) for r in rows for d in DATASETS}
    lines = [
        "# The paper's claims, measured on our data",
        "",
        "Generator SmolLM2-135M-Instruct with LoRA r = 16, MiniLM query/document towers, the bundled wiki-leads "
        "index (10,033 Wikipedia lead sections, 100-word passages), CPU. Trained on the answerable questions of "
        "nq-dev + trivia-dev (7,339 after holding out 150 for validation); evaluated on the first N answerable "
        "questions of each test split — **answerable**: a gold answer appears in some passage of the index (DPR "
        f"`has_answer`){_answerable(rows)}; the same questions for every row. Greedy decoding, k = 3 passages, answers ≤ 32 tokens. Scores in %, with 95 % "
        "percentile-bootstrap intervals; recall@k: a gold answer in the top k passages of the row's query tower (the 3 read, and the 5 of the issue).",
        "",
        f"The compared rows (fine-tuned …) train on the same data in the same order for the same {STEPS} steps of "
        "4 questions (seed 0, LR 3e-4, LoRA r = 16 on the generator and the query tower); the shipped default "
        "trains the same way for 300 steps, and so does the closed-book-300 row it is compared with.",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"## {dataset}", "", "| row | n | EM | F1 | answer contained | recall@3 (read) | recall@5 | scale s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            s = scores[(r.name, dataset)]
            if s is None:
                lines.append(f"| {r.what} | not run | | | | | | |")
                continue
            lines.append(f"| {r.what} | {s['n']} | {_cell(s['em'])} | {_cell(s['f1'])} | {_cell(s['contained'])} | "
                         f"{_cell(s.get('recall@3'))} | {_cell(s.get('recall@5'))} | {_scale(r)} |")
        lines.append("")
    lines += ["## The claims", ""]

    def em(name: str, dataset: str) -> float | None:
        s = scores.get((name, dataset))
        return None if s is None else s["em"][0]

    def recall(name: str, dataset: str) -> float | None:
        s = scores.get((name, dataset))
        return None if s is None or "recall@5" not in s else s["recall@5"][0]

    for dataset in DATASETS:
        rag, cb = em("token", dataset), em("closed-book", dataset)
        if rag is not None and cb is not None:
            ratio = "∞" if cb == 0 else f"{rag / cb:.2f}×"
            lines.append(f"- {dataset}: fine-tuned RAG-Token EM {100 * rag:.1f} vs closed-book {100 * cb:.1f} = "
                         f"{ratio} (goal ≥ 2×: **{'met' if cb == 0 and rag > 0 or cb > 0 and rag >= 2 * cb else 'not met'}**).")
        by_name = {r.name: r for r in rows}
        for trained in ("token", "default"):
            gain = _paired_recall_gain(by_name["zero-shot"], by_name[trained], dataset)
            if gain is None:
                continue
            mean, low, high, n = gain
            verdict = "met" if low > 0 else "not shown (the interval includes 0)" if mean > 0 else "not met"
            lines.append(f"- {dataset}: recall@5 of the query tower trained by the {trained} row minus the untrained "
                         f"tower's, on the same {n} questions: {100 * mean:+.1f} points [{100 * low:+.1f}, "
                         f"{100 * high:+.1f}] (goal: training the query tower raises it: **{verdict}**).")
        frozen, trained = recall("frozen-query", dataset), recall("token", dataset)
        if frozen is not None and trained is not None:
            lines.append(f"- {dataset}: recall@5 {100 * frozen:.1f} with the query tower frozen (= untrained) vs "
                         f"{100 * trained:.1f} trained, EM {100 * em('frozen-query', dataset):.1f} vs "
                         f"{100 * em('token', dataset):.1f}.")
    for dataset in DATASETS:
        rag, cb = em("default", dataset), em("closed-book-300", dataset)
        if rag is not None and cb:
            lines.append(f"- {dataset}: the shipped default (300 steps) EM {100 * rag:.1f} vs closed-book trained the same "
                         f"300 steps {100 * cb:.1f} = {rag / cb:.2f}× (goal ≥ 2×: **{'met' if rag >= 2 * cb else 'not met'}**).")
    default_trivia = em("default", "trivia-test")
    if default_trivia is not None:
        lines.append(f"- trivia-test: the shipped default's EM {100 * default_trivia:.1f} (goal ≥ 20: "
                     f"**{'met' if default_trivia >= 0.2 else 'not met'}**).")
    swap = RESULTS / "knowledge-swap.json"
    if swap.is_file():
        result = json.loads(swap.read_text())
        o, meta = result["overall"], result["run"]
        low, high = o["follows"]["ci95"]
        lines += ["", "## Answers follow the index (paper §4.5)", "",
                  f"`{meta['command']}` ({meta['model']}): of {o['n']} questions the model answered right with the "
                  f"bundled index, **{100 * o['follows']['rate']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]** answer "
                  f"with the substitute once the index states it (no retraining), {100 * o['stays']['rate']:.1f} % keep "
                  f"the original answer, {100 * o['other']['rate']:.1f} % say something else (the paper: 70 % / 68 %; "
                  f"goal ≥ 70 %: **{'met' if o['follows']['rate'] >= 0.7 else 'not met'}**). Details: "
                  "[knowledge-swap.md](knowledge-swap.md)."]
    try:  # the four kinds of reader side by side: costs, swap, which to choose (benchmarks/readers.py)
        from readers import section
    except ImportError:
        section = None
    if section is not None:
        lines += [""] + section(threads)
    lines += ["", "## Commands", "", "Each row, as `python benchmarks/training_claims.py run` runs it "
              f"(here with --threads {threads}):", "", "```"]
    for r in rows:
        lines.append(f"# {r.name}")
        if r.train is None and r.name == "default":
            lines.append("make train-default   # src/latentrag/default_model")
        for command in filter(None, [r.train_command(threads), *(r.eval_command(d, threads) for d in DATASETS)]):
            lines.append(shlex.join(command))
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report", "commands"])
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], help="default: every row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "training.md"))
    parser.add_argument("--note", default="", help="a file whose text is appended to the report")
    args = parser.parse_args(argv)
    rows = [r for r in ROWS if not args.rows or r.name in args.rows]
    if args.action == "commands":
        for r in rows:
            for command in filter(None, [r.train_command(args.threads),
                                         *(r.eval_command(d, args.threads) for d in DATASETS)]):
                print(shlex.join(command))
        return 0
    if args.action == "run":
        run(rows, args.threads)
    from latentrag.atomic import atomic_write_text

    text = report(ROWS, args.threads)
    if args.note:
        text += "\n" + Path(args.note).read_text()
    atomic_write_text(Path(args.out), text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
