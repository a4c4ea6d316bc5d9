"""What limits reading: the reader alone on the passage that states the answer, against the marginal over k.

    python benchmarks/reader_alone.py --model runs/cf08/model \\
        --swap benchmarks/results/knowledge-swap-cf08-written.json --limit 500 --threads 2

RAG answers from a mixture: RAG-Token weighs every token's distribution under each of the k passages by
p(z|x) (eq. 2), RAG-Sequence weighs whole answers (eq. 1). When a model misses an answer its passages hold —
or keeps its memory on a rewritten index — the miss is either the reader's (given the passage that states
the answer, it still does not copy it) or the mixture's (the other passages, weighted by p(z|x), outvote it).
This benchmark separates the two on the same questions, with no retraining:

* **true index** — the first --limit answerable questions of each split whose gold answer is in the k
  passages read: EM of the model as it answers (k passages, its mode), of RAG-Sequence on the same passages,
  and of the reader given only the best-ranked passage that holds a gold answer (k = 1: no mixture);
* **rewritten passages** — the questions a knowledge-swap report tested (`--swap`, its JSON): their k
  passages as retrieved from the true index, every gold alias in their texts and titles rewritten to the
  report's substitute (`knowledge_swap.rewrite`, the swap's own rule), retrieval scores kept — what the swap
  measures with the retrieval held fixed; the same three readers, each answer sorted into follows / stays /
  other (`knowledge_swap.outcome`).

Writes --out (.json and .md) with 95 % bootstrap intervals. Deterministic (greedy / thorough decoding).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
READERS = ("marginal", "sequence", "alone")
WHAT = {
    "marginal": "the model as it answers (k passages, its mode)",
    "sequence": "RAG-Sequence on the same k passages (thorough decoding, 1 beam)",
    "alone": "the reader alone on the best-ranked passage stating the answer (k = 1)",
}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _rewritten(retrieved, changes: list[tuple[list[str], str]]):
    """The batch with each question's passages rewritten by its (aliases, substitute); scores unchanged."""
    from latentrag.evaluation.knowledge_swap import rewrite
    from latentrag.retrieval.retriever import RetrievedBatch

    passages = [[replace(p, title=rewrite(p.title, [c]), text=rewrite(p.text, [c])) for p in row]
                for row, c in zip(retrieved.passages, changes, strict=True)]
    return RetrievedBatch(retrieved.questions, retrieved.ids, passages, retrieved.doc_vectors, retrieved.scores)


def _subset(retrieved, keep: list[int]):
    """The batch's questions at positions `keep`, with their passages and scores."""
    from latentrag.retrieval.retriever import RetrievedBatch

    return RetrievedBatch([retrieved.questions[i] for i in keep], retrieved.ids[keep],
                          [retrieved.passages[i] for i in keep], retrieved.doc_vectors[keep], retrieved.scores[keep])


def _stating(retrieved, answers: list[list[str]]):
    """Each question's best-ranked passage holding one of its answers (k = 1), or None where none does."""
    from latentrag.evaluation import metrics as M

    rows = []
    for passages, golds in zip(retrieved.passages, answers, strict=True):
        rows.append(next((i for i, p in enumerate(passages) if M.has_answer(p.text, golds)), None))
    return rows


def answer_three_ways(model, retrieved, answers: list[list[str]], max_new_tokens: int) -> dict[str, list[str]]:
    """The three readers' answers for one batch; `answers` say which passage the lone reader gets."""
    out = {"marginal": [a.text for a in model.generate(retrieved.questions, retrieved=retrieved,
                                                       max_new_tokens=max_new_tokens)],
           "sequence": [a.text for a in model.generate(retrieved.questions, retrieved=retrieved, mode="sequence",
                                                       num_beams=1, max_new_tokens=max_new_tokens)]}
    rows = _stating(retrieved, answers)
    if any(r is None for r in rows):
        raise ValueError("every question here must have a passage stating its answer")
    alone = retrieved.pick([[r] for r in rows])
    out["alone"] = [a.text for a in model.generate(alone.questions, retrieved=alone, max_new_tokens=max_new_tokens)]
    return out


def _rate(values: list[float]) -> dict:
    from latentrag.evaluation import metrics as M

    low, high = M.bootstrap_interval(values, seed=0)
    return {"rate": sum(values) / len(values), "count": int(sum(values)), "ci95": [low, high]}


def true_index(model, examples, k: int, batch_size: int, max_new_tokens: int) -> tuple[list[dict], int]:
    from tqdm.auto import tqdm

    from latentrag.evaluation import metrics as M

    records, examined = [], 0
    for batch in tqdm(list(_batches(examples, batch_size)), desc="true index", unit="batch"):
        retrieved = model.retrieve([ex.question for ex in batch], k)
        examined += len(batch)
        keep = [i for i, ex in enumerate(batch) if any(M.has_answer(p.text, ex.answers) for p in retrieved.passages[i])]
        if not keep:
            continue
        read = _subset(retrieved, keep)
        golds = [list(batch[i].answers) for i in keep]
        texts = answer_three_ways(model, read, golds, max_new_tokens)
        for j, i in enumerate(keep):
            records.append({"id": batch[i].id, "question": batch[i].question, "gold": golds[j],
                            **{r: texts[r][j] for r in READERS},
                            **{f"{r}_em": M.exact_match(texts[r][j], golds[j]) for r in READERS}})
    return records, examined


def rewritten_passages(model, swap_records: list[dict], k: int, batch_size: int, max_new_tokens: int) -> list[dict]:
    from tqdm.auto import tqdm

    from latentrag.evaluation import metrics as M
    from latentrag.evaluation.knowledge_swap import outcome

    records = []
    for batch in tqdm(list(_batches(swap_records, batch_size)), desc="rewritten", unit="batch"):
        retrieved = model.retrieve([r["question"] for r in batch], k)
        changes = [(list(r["gold"]), r["substitute"]) for r in batch]
        rewritten = _rewritten(retrieved, changes)
        keep = [i for i, r in enumerate(batch)
                if any(M.has_answer(p.text, [r["substitute"]]) for p in rewritten.passages[i])
                and not any(M.has_answer(p.text, r["gold"]) for p in rewritten.passages[i])]
        if not keep:
            continue
        rewritten = _subset(rewritten, keep)
        texts = answer_three_ways(model, rewritten, [[batch[i]["substitute"]] for i in keep], max_new_tokens)
        for j, i in enumerate(keep):
            r = batch[i]
            records.append({"id": r["id"], "question": r["question"], "stated": r.get("stated"),
                            "substitute": r["substitute"], **{x: texts[x][j] for x in READERS},
                            **{f"{x}_outcome": outcome(texts[x][j], r["gold"], r["substitute"]) for x in READERS}})
    return records


def summarise(true_records: list[dict], swap_records: list[dict]) -> dict:
    out = {"true_index": {"n": len(true_records)}, "rewritten": {"n": len(swap_records)}}
    for r in READERS:
        if true_records:
            out["true_index"][r] = _rate([x[f"{r}_em"] for x in true_records])
        if swap_records:
            out["rewritten"][r] = {o: _rate([float(x[f"{r}_outcome"] == o) for x in swap_records])
                                   for o in ("follows", "stays", "other")}
    return out


def markdown(summary: dict, settings: dict, examples: list[dict]) -> str:
    def pct(d):
        return f"{100 * d['rate']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"

    t, s = summary["true_index"], summary["rewritten"]
    lines = [
        "# What limits reading: the reader alone against the marginal", "",
        f"Model `{settings['model']}`, k = {settings['k']}, its mode `{settings['mode']}`; "
        f"`{settings['command']}` ({settings['minutes']:.1f} min, load average {settings['load']} at the start).", "",
        f"**True index**: {t['n']} questions (the first {settings['limit']} answerable of each split, "
        f"{settings['examined']} examined) whose gold answer is in the {settings['k']} passages read — EM "
        f"(= the reading accuracy of `latentrag eval`):", "",
        "| reader | EM on questions whose answer is read |", "|---|---|",
        *[f"| {WHAT[r]} | {pct(t[r])} |" for r in READERS if r in t], "",
        f"**Rewritten passages**: the {s['n']} questions of `{settings['swap']}` whose rewritten passages state "
        "the substitute (each question's own passages as retrieved from the true index, every gold alias "
        "rewritten, scores kept):", "",
        "| reader | follows | stays | other |", "|---|---|---|---|",
        *[f"| {WHAT[r]} | {pct(s[r]['follows'])} | {pct(s[r]['stays'])} | {pct(s[r]['other'])} |"
          for r in READERS if r in s], "",
        "Examples where the lone reader follows and the marginal does not:", "",
        "| question | substitute | marginal | alone |", "|---|---|---|---|",
        *[f"| {e['question']} | {e['substitute']} | {e['marginal']} | {e['alone']} |" for e in examples], "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved RagModel folder (default: the shipped default)")
    parser.add_argument("--swap", required=True, help="a knowledge-swap report's JSON: the questions and substitutes")
    parser.add_argument("--dataset", default="trivia-test,nq-test")
    parser.add_argument("--limit", type=int, default=500, help="answerable questions examined per data set")
    parser.add_argument("--k", type=int, default=None, help="passages read (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "reader-alone"), help="results stem (.json, .md)")
    args = parser.parse_args(argv)

    import os

    from latentrag.errors import LatentRagError
    from latentrag.evaluation.evaluate import EvalSettings, select_examples
    from latentrag.loading import load_model
    from latentrag.threads import configure_threads

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    configure_threads(args.threads)
    try:
        report = json.loads(Path(args.swap).read_text())
        swap_records = report["records"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: --swap {args.swap} is not a knowledge-swap report's JSON ({e})", file=sys.stderr)
        return 1
    try:
        model = load_model(args.model).eval()
        k = args.k or model.config.k
        examples, examined = [], 0
        for dataset in [d.strip() for d in args.dataset.split(",") if d.strip()]:
            examples += select_examples(EvalSettings(dataset=dataset, answerable_only=True, limit=args.limit),
                                        model.retriever.index)[0]
        true_records, examined = true_index(model, examples, k, args.batch_size, args.max_new_tokens)
        swapped = rewritten_passages(model, swap_records, k, args.batch_size, args.max_new_tokens)
    except LatentRagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = summarise(true_records, swapped)
    settings = {"model": args.model or "the shipped default", "k": k, "mode": model.config.mode, "limit": args.limit,
                "examined": examined, "swap": args.swap, "threads": args.threads, "load": load,
                "minutes": (time.perf_counter() - start) / 60,
                "command": "python benchmarks/reader_alone.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    contrast = [r for r in swapped if r["alone_outcome"] == "follows" and r["marginal_outcome"] != "follows"][:12]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from latentrag.atomic import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"settings": settings, "summary": summary, "true_index": true_records, "rewritten": swapped}, indent=1))
    atomic_write_text(out.with_suffix(".md"), markdown(summary, settings, contrast))
    print(markdown(summary, settings, contrast))
    return 0


if __name__ == "__main__":
    sys.exit(main())
