"""The zero-shot baseline report: the default model (bundled MiniLM + SmolLM2-135M-Instruct, wiki-leads index)
on answerable NQ-test and TriviaQA-test questions — RAG-Token, RAG-Sequence, closed-book, answer recall@k,
and EM/F1/answer-contained against k. The numbers fine-tuning must beat.

    python benchmarks/eval_zero_shot.py                      # full report (slow on CPU: see --help)
    python benchmarks/eval_zero_shot.py --limit 20 --runs token --no-sweep --work /tmp/ev   # timing probe

Every run is resumable (re-running continues where it stopped); per-run predictions go to --work, the
combined report, metrics JSON and plots to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from latentrag.atomic import atomic_write_text
from latentrag.evaluation.evaluate import (
    PREDICTIONS,
    EvalSettings,
    evaluate,
    read_predictions,
    retrieval_recall,
    select_examples,
)
from latentrag.evaluation.report import write_comparison_report

HERE = Path(__file__).resolve().parent
RUNS = {
    "token": {"mode": "token", "decoding": "greedy"},
    "sequence": {"mode": "sequence"},
    "closed-book": {"closed_book": True},
}


def _without_notes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["nq-test", "trivia-test"])
    parser.add_argument("--limit", type=int, default=500, help="answerable questions per data set")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--sequence-decoding", default="thorough", choices=["thorough", "fast"])
    parser.add_argument("--sequence-beams", type=int, default=4, help="beams per passage for RAG-Sequence")
    parser.add_argument("--sweep-ks", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--sweep-limit", type=int, default=100, help="questions per data set in the k sweep")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--recall-limit", type=int, default=None,
                        help="questions for the retrieval-only recall@k (default: --limit)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", default="eval-runs/zero-shot", help="per-run folders (predictions)")
    parser.add_argument("--report", default=str(HERE / "results" / "eval-zero-shot.md"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", action="append", default=[], help="a paragraph to put first in the report")
    args = parser.parse_args(argv)

    from latentrag.cli import _quiet_transformers
    from latentrag.model import RagModel
    from latentrag.retrieval.index import default_index
    from latentrag.threads import configure_threads

    threads = configure_threads(args.threads)
    _quiet_transformers()
    index = default_index()
    model = RagModel.from_components(index=index).to(args.device).eval()
    work = Path(args.work)
    results, sweep, timings = [], [], {}

    def run(dataset: str, name: str, k: int, limit: int, folder: Path) -> dict:
        opts = dict(RUNS[name])
        if name == "sequence":
            opts.update(num_beams=args.sequence_beams, decoding=args.sequence_decoding)
        settings = EvalSettings(dataset=dataset, k=k, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, answerable_only=True, limit=limit, **opts)
        examples, info = select_examples(settings, model.retriever.index, progress=True)
        before = len(read_predictions(folder / PREDICTIONS)) if (folder / PREDICTIONS).exists() else 0
        start = time.perf_counter()
        result = evaluate(model, settings, folder, resume=True, examples=examples, info=info)
        new = len(examples) - before
        if new > 0:
            timings[f"{dataset} {result['label']}"] = (time.perf_counter() - start) / new
        return result

    recall = {}
    for dataset in args.datasets:
        settings = EvalSettings(dataset=dataset, answerable_only=True, limit=args.recall_limit or args.limit)
        examples, _ = select_examples(settings, model.retriever.index)
        recall[dataset] = (len(examples), retrieval_recall(model, examples, progress=True))
        for name in args.runs:
            results.append(run(dataset, name, args.k, args.limit, work / f"{dataset}-{name}-k{args.k}"))
        if not args.no_sweep:
            for k in args.sweep_ks:
                sweep.append(run(dataset, "token", k, args.sweep_limit, work / f"{dataset}-sweep-token-k{k}"))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {threads} threads"
    notes = [*(f"> {n}\n" for n in args.note),
        "Zero-shot baseline: `RagModel.from_components()` — query/document towers all-MiniLM-L6-v2, generator "
        "SmolLM2-135M-Instruct (no fine-tuning), flat index over the bundled wiki-leads corpus (lead sections "
        "of 10,033 Wikipedia vital articles, CC BY-SA 4.0, ~100-word passages). This is the baseline "
        "fine-tuning must beat.",
        "",
        f"**Answerable-only filter ON**: only questions with a gold answer in some passage of the index (DPR "
        f"`has_answer`) are kept, then the first {args.limit} of them; each section gives the counts. Numbers "
        "are therefore not comparable with the paper's full-Wikipedia figures.",
        "",
        "SmolLM2 zero-shot answers in sentences, not short spans, so exact match is low by construction; token "
        "F1 and **answer contained** (DPR `has_answer` on the prediction: a gold answer's tokens occur in the "
        "generated text) show what the model knows. Scores in %, BLEU on sacrebleu's 0–100 scale.",
        "",
        "Runs: " + "; ".join(
            {"token": f"RAG-Token greedy (k={args.k})",
             "sequence": f"RAG-Sequence {args.sequence_decoding} decoding ({args.sequence_beams} beams per passage, "
                         f"k={args.k})",
             "closed-book": "closed-book = the same generator with the same prompt minus its Title/Passage lines, "
                            "greedy"}[name] for name in args.runs)
        + f". max_new_tokens={args.max_new_tokens}. Device: {device} ({platform.machine()}).",
        "",
        "Reproduce: `python benchmarks/eval_zero_shot.py " + " ".join(_without_notes(argv or sys.argv[1:]))
        + "`; single runs: `latentrag eval --dataset nq-test --answerable-only --limit 500 --k 5`.",
    ]
    if timings:
        notes += ["", "Seconds per question (this run, batch size " + str(args.batch_size) + "): "
                  + "; ".join(f"{k}: {v:.2f}" for k, v in timings.items()) + "."]
    report = Path(args.report)
    figures = report.with_suffix("")
    write_comparison_report(report, results, "Zero-shot evaluation of the default model", notes, sweep, figures,
                            recall=recall)
    atomic_write_text(figures / "metrics.json", json.dumps(
        {"runs": results, "sweep": sweep, "retrieval_recall": {d: {"n": n, "recall": r} for d, (n, r) in recall.items()},
         "seconds_per_question": timings, "device": device}, indent=2))
    print(f"wrote {report} and {figures}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
