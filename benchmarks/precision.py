"""What a training step costs, and what of it the prompt is: fp32 against bf16 autocast on CPU, the tokens
each passage's prompt spends on the chat template, system prompt and instruction, and the step with the compact
prompt (`latentrag train --prompt compact`) that drops them.

    python benchmarks/precision.py --threads 2            # default models; about 5 minutes on 2 quiet cores

Step: the shipped default's recipe (RAG-Token, k = 3, LoRA r = 16 on the generator and the query tower, B = 4
nq-dev/trivia-dev questions whose answer is in the index), forward + backward, in fp32 and under
`torch.autocast("cpu", torch.bfloat16)` (what `latentrag train --precision bf16` does), and in bf16 with the
compact prompt (same weights, each row written without instruction and default system prompt), alternating on
the same batches; the figure is the median of --rounds timed steps after one untimed each, as a ratio measured in one
run (the machine is shared). Quality: the two precisions' losses on the same batches, and the greedy answers of
the same model on --questions held-out questions under each (how often they agree, and each one's EM).

Prompt: for --questions questions and their top-3 passages, the tokens of the generator's input per (question,
passage) row, split into the passage (title + text), the question, and the rest (chat template, its default
system prompt, the instruction) — which RAG pays once per passage row at every training step —, and the same
rows' tokens with the compact prompt.

Writes benchmarks/results/precision.{json,md}. The load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _prompt_cost(model, questions: list[str]) -> dict:
    generator = model.generator
    tok = generator.tokenizer
    passages = model.retrieve(questions, 3).passages

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = []
    for q, ps in zip(questions, passages, strict=True):
        for p in ps:
            full = n(generator.format_prompt(q, p))
            passage = n(f"Title: {p.title}\nPassage: {p.text}")
            question = n(f"Question: {q}")
            rows.append((full, passage, question))
    instruction = n(generator.instruction)
    empty = generator.format_prompt("", type(ps[0])(id="", title="", text=""))
    style = generator.prompt_style
    generator.set_prompt("compact")
    compact = [n(generator.format_prompt(q, p)) for q, ps in zip(questions, passages, strict=True) for p in ps]
    empty_compact = generator.format_prompt("", type(ps[0])(id="", title="", text=""))
    generator.set_prompt(style)
    return {
        "compact_prompt_tokens": statistics.mean(compact),
        "empty_compact_prompt": empty_compact,
        "rows": len(rows),
        "prompt_tokens": statistics.mean(r[0] for r in rows),
        "passage_tokens": statistics.mean(r[1] for r in rows),
        "question_tokens": statistics.mean(r[2] for r in rows),
        "overhead_tokens": statistics.mean(r[0] - r[1] - r[2] for r in rows),
        "instruction_tokens": instruction,
        "empty_prompt_tokens": n(empty),
        "empty_prompt": empty,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model for the greedy comparison (default: shipped)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per precision (after one untimed)")
    parser.add_argument("--questions", type=int, default=100, help="held-out questions for greedy agreement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "precision"))
    args = parser.parse_args(argv)

    import torch

    from latentrag.atomic import atomic_write_text
    from latentrag.cli import _quiet_transformers
    from latentrag.evaluation import metrics as M
    from latentrag.loading import load_model
    from latentrag.threads import configure_threads
    from latentrag.training.trainer import Objective, TrainSettings, _resolve_index, build_model, load_data

    load_before = os.getloadavg()
    threads = configure_threads(args.threads)
    _quiet_transformers()
    settings = TrainSettings(train="nq-dev,trivia-dev", out="/tmp/unused", k=3, lora_rank=16, retrieval_scale=20,
                             learn_retrieval_scale=True, answerable_only=True)
    index = _resolve_index(None)
    pairs, val_pairs, _ = load_data(settings, index)
    model = build_model(settings, index, torch.device("cpu"))
    objective = Objective(model, "token", 3, False)
    model.train()
    model.retriever.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    arms = ("fp32", "bf16", "bf16-compact")
    times: dict[str, list[float]] = {name: [] for name in arms}
    losses: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds + 1):
        batch = pairs[4 * r : 4 * r + 4]
        for name in arms:
            model.generator.set_prompt("compact" if name.endswith("compact") else "full")
            context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32")
            start = time.perf_counter()
            with context:
                loss = objective([p.question for p in batch], [p.answer for p in batch]).mean()
            loss.backward()
            for p in trainable:
                p.grad = None
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
                losses[name].append(loss.item())
            print(f"round {r} {name}: {time.perf_counter() - start:.2f} s, loss {loss.item():.4f}", file=sys.stderr)
    del model, objective
    trained = load_model(args.model).eval()
    questions = val_pairs[: args.questions]
    greedy = {}
    for name in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"), torch.inference_mode():
            greedy[name] = [a.text for start in range(0, len(questions), 8)
                            for a in trained.generate([p.question for p in questions[start : start + 8]],
                                                      mode="token", k=3, max_new_tokens=24)]
    em = {name: 100 * statistics.mean(M.exact_match(t, p.answers) for t, p in zip(texts, questions, strict=True))
          for name, texts in greedy.items()}
    agree = 100 * statistics.mean(a == b for a, b in zip(greedy["fp32"], greedy["bf16"], strict=True))
    prompt = _prompt_cost(trained, [p.question for p in questions])
    seconds = {name: statistics.median(times[name]) for name in arms}
    result = {
        "step_seconds": seconds, "speedup": seconds["fp32"] / seconds["bf16"],
        "compact_speedup": seconds["bf16"] / seconds["bf16-compact"], "times": times, "losses": losses,
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)),
        "greedy_exact_match": em, "greedy_agreement": agree, "questions": len(questions), "prompt": prompt,
        "machine": f"CPU, {threads} thread(s), {platform.machine()}", "model": args.model or "the shipped default",
        "load_before": load_before, "load_after": os.getloadavg(),
        "command": "python benchmarks/precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    p = r["prompt"]
    return "\n".join([
        "# Precision and prompt cost of a training step",
        "",
        f"Reproduce: `{r['command']}` ({r['machine']}; load average {r['load_before'][0]:.2f} before, "
        f"{r['load_after'][0]:.2f} after).",
        "",
        "| precision | seconds / step (median) | losses on the same batches |",
        "|---|---:|---|",
        *(f"| {name} | {r['step_seconds'][name]:.2f} | " + ", ".join(f"{x:.3f}" for x in r["losses"][name]) + " |"
          for name in r["step_seconds"]),
        "",
        f"bf16 autocast is **{r['speedup']:.2f}×** faster per step; the losses differ by at most "
        f"{r['max_loss_difference']:.3f} nats. Greedy answers of {r['model']} on {r['questions']} held-out "
        f"questions: EM {r['greedy_exact_match']['fp32']:.1f} (fp32) vs {r['greedy_exact_match']['bf16']:.1f} "
        f"(bf16), the same text for {r['greedy_agreement']:.0f} %. Retrieval scores s·dᵀq stay fp32 under autocast.",
        "",
        "## What a passage's prompt costs",
        "",
        f"Per (question, passage) row, over {p['rows']} rows: {p['prompt_tokens']:.0f} tokens, of which the passage "
        f"(title + text) {p['passage_tokens']:.0f}, the question {p['question_tokens']:.0f}, and the rest — chat "
        f"template, its default system prompt, the instruction ({p['instruction_tokens']} tokens) — "
        f"{p['overhead_tokens']:.0f} ({100 * p['overhead_tokens'] / p['prompt_tokens']:.0f} %). RAG reads each "
        "passage in its own row, so this is paid k times per question at every step. The empty prompt:",
        "",
        "```",
        p["empty_prompt"],
        "```",
        "",
        *_compact_lines(r),
    ])


def _compact_lines(r: dict) -> list[str]:
    p = r["prompt"]
    if "compact_prompt_tokens" not in p:  # a result written before the compact prompt existed
        return []
    return [
        f"The compact prompt (`latentrag train --prompt compact`: no instruction, an empty system turn) writes the "
        f"same rows in {p['compact_prompt_tokens']:.0f} tokens ({100 * (1 - p['compact_prompt_tokens'] / p['prompt_tokens']):.0f} % "
        f"fewer); a bf16 step with it is **{r['compact_speedup']:.2f}×** faster than with the full prompt (same "
        "weights; its losses differ because an untrained model reads another input). Its empty prompt:",
        "",
        "```",
        p["empty_compact_prompt"],
        "```",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
