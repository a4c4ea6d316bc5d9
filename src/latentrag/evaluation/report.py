"""Markdown reports and plots (matplotlib, Agg backend) for evaluation runs, written atomically.

`write_run_report(out_dir, result)`: one run's metrics and its answer recall@k plot.
`write_comparison_report(path, results, ...)`: several runs side by side (RAG-Token, RAG-Sequence,
closed-book, per data set), answer recall@k and EM/F1/answer-contained against k.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from latentrag.atomic import atomic_path, atomic_write_text

RUN_COLUMNS = [
    ("exact_match", "EM"),
    ("regex_match", "regex match"),
    ("f1", "F1"),
    ("answer_contained", "answer contained"),
    ("reading_accuracy", "reading acc."),
    ("attribution", "attribution"),
    ("copied", "copied"),
    ("bleu1", "BLEU-1"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("q_bleu1", "Q-BLEU-1"),
    ("distinct_3", "distinct-3"),
    ("label_accuracy", "label acc."),
    ("mean_prediction_words", "words/answer"),
]
PERCENT = {"exact_match", "regex_match", "f1", "answer_contained", "reading_accuracy", "attribution", "copied", "rouge_l", "q_bleu1", "label_accuracy", "distinct_3"}


def _fmt(key: str, value) -> str:
    if value is None:
        return "–"
    if key in PERCENT:
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recall(curves: dict[str, dict], path: Path, title: str = "Answer recall@k") -> None:
    """One line per label: {label: {"1": r1, "5": r5, ...}} (fractions) -> a png of recall (%) against k."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, recall in curves.items():
        ks = sorted(int(k) for k in recall)
        ax.plot(ks, [100 * recall[str(k)] for k in ks], marker="o", label=label)
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("answer recall@k (%)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({int(k) for r in curves.values() for k in r}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    _savefig(fig, path)
    plt.close(fig)


def plot_against_k(series: dict[str, list[tuple[int, float]]], path: Path, ylabel: str, title: str) -> None:
    """One line per label of (k, value) points (fractions) -> a png of value (%) against k."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([k for k, _ in points], [100 * v for _, v in points], marker="o", label=label)
    ax.set_xlabel("k (passages the generator reads)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    _savefig(fig, path)
    plt.close(fig)


def data_note(data: dict) -> str:
    """The sentence every report carries: which questions were scored, and whether the answerable filter was on."""
    total, n = data.get("total_questions"), data.get("evaluated_questions")
    name = data.get("dataset", "?")
    if data.get("answerable_only"):
        return (
            f"**{name}**: answerable-only filter ON — {data.get('answerable_questions')} of {total} questions have a "
            f"gold answer in some passage of the index (DPR `has_answer`); {n} of those evaluated."
        )
    of = f" of {total}" if total else ""
    return f"**{name}**: all questions (no answerable filter); {n}{of} evaluated."


def _metric_table(rows: Sequence[tuple[str, dict]]) -> list[str]:
    keys = [(k, h) for k, h in RUN_COLUMNS if any(m.get(k) is not None for _, m in rows)]
    lines = ["| run | " + " | ".join(h for _, h in keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(k, m.get(k)) for k, _ in keys) + " |")
    return lines


def _recall_table(rows: Sequence[tuple[str, dict]]) -> list[str]:
    ks = sorted({int(k) for _, r in rows for k in r})
    lines = ["| retriever | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt("f1", r.get(str(k))) for k in ks) + " |")
    return lines


def write_run_report(out_dir: str | Path, result: dict, examples: int = 5) -> Path:
    """report.md (+ recall_at_k.png) for one run's metrics.json content."""
    out = Path(out_dir)
    m, data, label = result["metrics"], result.get("data", {}), result.get("label", "run")
    lines = [f"# {label} on {data.get('dataset', '?')}", "", data_note(data), ""]
    lines += ["Scores in % (BLEU on sacrebleu's 0–100 scale); `–` where a metric does not apply.", ""]
    lines += _metric_table([(label, m)]) + [""]
    if m.get("answer_recall"):
        plot_recall({label: m["answer_recall"]}, out / "recall_at_k.png")
        lines += ["## Answer recall@k", "", *_recall_table([("retriever", m["answer_recall"])]), "",
                  "![answer recall@k](recall_at_k.png)", ""]
    settings = result.get("settings", {})
    if settings:
        lines += ["## Settings", "", "```", *(f"{k}: {v}" for k, v in settings.items()), "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def write_comparison_report(
    path: str | Path,
    results: Sequence[dict],
    title: str,
    notes: Sequence[str] = (),
    sweep: Sequence[dict] = (),
    figures_dir: str | Path | None = None,
    recall: dict[str, tuple[int, dict]] | None = None,
) -> Path:
    """Several runs side by side, grouped by data set; `sweep` holds runs over k for the EM-against-k plot;
    `recall` ({dataset: (n, {k: recall})}) gives retrieval-only recall@k measured on more questions."""
    path = Path(path)
    figures = Path(figures_dir) if figures_dir else path.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    rel = figures.relative_to(path.parent) if figures.is_relative_to(path.parent) else figures
    lines = [f"# {title}", "", *notes, ""]
    datasets: dict[str, list[dict]] = {}
    for r in results:
        datasets.setdefault(r["data"]["dataset"], []).append(r)
    curves = {}
    for name, runs in datasets.items():
        lines += [f"## {name}", "", data_note(runs[0]["data"]), ""]
        lines += _metric_table([(r["label"], r["metrics"]) for r in runs]) + [""]
        if recall and name in recall:
            n, curves[name] = recall[name]
            lines += _recall_table([(f"{name}: retriever alone, first {n} questions (answer recall@k, %)",
                                     curves[name])]) + [""]
            continue
        found = next((r["metrics"]["answer_recall"] for r in runs if r["metrics"].get("answer_recall")), None)
        if found:
            curves[name] = found
            lines += _recall_table([(f"{name} (answer recall@k, %)", found)]) + [""]
    if curves:
        plot_recall(curves, figures / "recall_at_k.png")
        lines += ["## Answer recall@k", "", f"![answer recall@k]({rel}/recall_at_k.png)", ""]
    if sweep:
        by_metric = {"exact_match": "EM (%)", "f1": "token F1 (%)", "answer_contained": "answer contained (%)"}
        lines += ["## Against k", ""]
        rows = []
        for key, ylabel in by_metric.items():
            series: dict[str, list[tuple[int, float]]] = {}
            for r in sweep:
                if r["metrics"].get(key) is not None:
                    name = f"{r['data']['dataset']} {r['settings'].get('mode', '')}".strip()
                    series.setdefault(name, []).append((r["settings"]["k"], r["metrics"][key]))
            if series:
                file = f"{key}_against_k.png"
                plot_against_k(series, figures / file, ylabel, f"{ylabel.split(' (')[0]} against k")
                lines += [f"![{ylabel} against k]({rel}/{file})", ""]
        for r in sweep:
            rows.append((f"{r['data']['dataset']}: {r['label']} (n={r['metrics']['n']})", r["metrics"]))
        lines += _metric_table(rows) + [""]
    atomic_write_text(path, "\n".join(lines))
    return path
