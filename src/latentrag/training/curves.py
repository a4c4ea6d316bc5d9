"""The learning curve of a run, drawn from its log: training loss, validation exact match and recall@5."""

from __future__ import annotations

import json
from pathlib import Path

from latentrag.atomic import atomic_path


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line of a killed run: what follows it is not there
    return records


def plot_learning_curve(log: list[dict], png: Path, title: str = "") -> None:
    """loss per step (and its running mean) on the left; validation EM and recall@5 on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in log if "loss" in r]
    vals = [r for r in log if "val" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
        left.plot(xs, ys, color="0.75", linewidth=0.8, label="loss per step")
        window = max(1, len(ys) // 20)
        smooth = [sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
                  for i in range(len(ys))]
        left.plot(xs, smooth, color="C0", label=f"mean of {window}")
    if vals:
        left.plot([r["step"] for r in vals], [r["val"]["loss"] for r in vals], "o-", color="C3", label="validation")
        right.plot([r["step"] for r in vals], [r["val"]["exact_match"] for r in vals], "o-", label="exact match")
        if "recall@5" in vals[-1]["val"]:
            right.plot([r["step"] for r in vals], [r["val"]["recall@5"] for r in vals], "s-", label="answer recall@5")
    left.set(xlabel="step", ylabel="−log p(y|x)", title="training loss")
    right.set(xlabel="step", ylabel="% of validation questions", title="validation", ylim=(0, 100))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
