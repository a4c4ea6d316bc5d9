"""Decoding speed: latentrag against Hugging Face's RAG implementation, measured in one run.

    python benchmarks/decoding.py --quick      # under a minute
    python benchmarks/decoding.py              # the figures in benchmarks/results/decoding.{json,md}

Both implementations decode with the *same* randomly initialised BART weights (one module, shared), the
same passages (lead sections of the bundled Wikipedia corpus, truncated to one length so that HF's
RAG-Sequence, which drops the context mask in its per-passage beam search, sees what latentrag sees),
the same doc_scores and the same settings (HF's parity configuration: forced <s>, no forced </s>,
length_penalty 1.0). The outputs are checked equal before anything is timed. Timings alternate between
the two implementations and report medians; the machine is shared, so read the ratios.

Measured:
  * RAG-Token beam search: latentrag `rag_token_decode` vs `RagTokenForGeneration.generate`;
  * RAG-Sequence thorough: latentrag `rag_sequence_decode(thorough)` vs `RagSequenceForGeneration.generate`;
  * RAG-Sequence fast vs thorough (both latentrag);
  * generated tokens/s of the default generator (SmolLM2-135M via `load_generator("smollm2")`), k = 5,
    RAG-Token greedy and beam, RAG-Sequence fast.

With random weights no hypothesis ends early and the beams of different passages rarely coincide, so
every search runs to max_new_tokens and RAG-Sequence has beams·k distinct candidates: a worst case for
thorough re-scoring. The last line printed is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from latentrag.defaults import PASSAGE_WORDS
from latentrag.generation.decoding import DecodeOptions, rag_sequence_decode, rag_token_decode
from latentrag.generation.generators import Seq2SeqGenerator
from latentrag.marginals import retrieval_log_prior
from latentrag.retrieval.corpus import Passage, read_corpus, split_passages
from latentrag.threads import configure_threads

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "who wrote the novel war and peace",
    "what is the largest planet in the solar system",
    "when did the first man walk on the moon",
    "which element has the chemical symbol fe",
    "who painted the mona lisa",
    "what is the capital city of australia",
    "how many symphonies did beethoven write",
    "which river flows through cairo",
]
SIZES = {  # random BART shapes; the vocabulary is SmolLM2's 49,152 tokens (BART's is 50,265)
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024),
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}


def bart_style_tokenizer():
    """SmolLM2's byte-level BPE dressed as BART's tokenizer: <s>=0, <pad>=1, </s>=2 (SmolLM2's ids 0-2),
    "<s> text </s>" for inputs and labels. Offline: it comes from the bundled model's tokenizer.json."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from latentrag.assets import smollm2_dir

    tok = Tokenizer.from_file(str(smollm2_dir() / "tokenizer.json"))
    bos, pad, eos = (tok.id_to_token(i) for i in range(3))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}", special_tokens=[(bos, 0), (eos, 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=bos)


def random_bart(size: str, tokenizer, seed: int = 0) -> Seq2SeqGenerator:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, **SIZES[size])
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    return Seq2SeqGenerator(model, tokenizer, f"random-bart-{size}", max_input_length=128)


def passages(n: int) -> list[Passage]:
    out = []
    for p in split_passages(read_corpus("wiki-leads"), words=PASSAGE_WORDS):
        if len(p.text.split()) >= 95:  # long enough to fill 128 tokens: every context has one length
            out.append(p)
        if len(out) == n:
            return out
    raise SystemExit("the corpus has too few passages")


def timed(fn, repeats: int) -> tuple[list[tuple[float, float]], object]:
    """(wall, CPU) seconds of each run. CPU time (all threads) is less sensitive to other processes."""
    times, result = [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times, result


def alternate(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each function over `repeats` runs taken in turns (a, b, a, b, ...) so that
    load from other processes hits all alike: the minimum (timeit's estimator: the run least disturbed)
    and the median."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (allocator, kernels), not timed
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += timed(fn, 1)[0]
    return {name: {"wall": min(t[0] for t in ts), "cpu": min(t[1] for t in ts),
                   "wall_median": statistics.median(t[0] for t in ts),
                   "cpu_median": statistics.median(t[1] for t in ts)}
            for name, ts in samples.items()}


def hf_model(cls, generator, k: int):
    from transformers import DPRConfig, DPRQuestionEncoder
    from transformers import RagConfig as HFRagConfig

    question_encoder = DPRQuestionEncoder(DPRConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64)).eval()
    config = HFRagConfig.from_question_encoder_generator_configs(question_encoder.config, generator.model.config,
                                                                 n_docs=k)
    return cls(config, question_encoder=question_encoder, generator=generator.model).eval()


def hf_kwargs(generator, opts: DecodeOptions, k: int) -> dict:
    return dict(n_docs=k, num_beams=opts.num_beams, max_length=opts.max_new_tokens + 2,
                min_length=opts.min_new_tokens + 2, length_penalty=opts.length_penalty,
                forced_bos_token_id=generator.tokenizer.bos_token_id, forced_eos_token_id=None)


def strip(row: list[int]) -> list[int]:
    row = row[2:]  # decoder start, forced <s>
    return row[: row.index(2) + 1] if 2 in row else [t for t in row if t != 1]


@torch.inference_mode()
def versus_hf(size: str, questions: int, k: int, beams: int, max_new: int, repeats: int) -> dict:
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    tokenizer = bart_style_tokenizer()
    gen = random_bart(size, tokenizer)
    docs = passages(questions * k)
    qs = QUESTIONS[:questions]
    batch = gen.prepare(qs, [docs[b * k : (b + 1) * k] for b in range(questions)])
    assert bool(batch.attention_mask.all()), "contexts must share one length (see the module docstring)"
    scores = torch.randn(questions, k, generator=torch.Generator().manual_seed(0))
    log_prior = retrieval_log_prior(scores)
    opts = DecodeOptions(max_new_tokens=max_new, num_beams=beams, length_penalty=1.0)
    hf_token, hf_seq = hf_model(RagTokenForGeneration, gen, k), hf_model(RagSequenceForGeneration, gen, k)
    context = dict(context_input_ids=batch.input_ids, context_attention_mask=batch.attention_mask, doc_scores=scores)
    kw = hf_kwargs(gen, opts, k)

    runs = {
        "token_beam_latentrag": lambda: rag_token_decode(gen, batch, log_prior, opts),
        "token_beam_hf": lambda: hf_token.generate(**context, **kw),
        "sequence_thorough_latentrag": lambda: rag_sequence_decode(gen, batch, log_prior, opts, "thorough"),
        "sequence_thorough_hf": lambda: hf_seq.generate(**context, **kw),
        "sequence_fast_latentrag": lambda: rag_sequence_decode(gen, batch, log_prior, opts, "fast"),
    }
    # the same answers first: a speed comparison of different computations would mean nothing
    thorough = runs["sequence_thorough_latentrag"]()
    same = {
        "token_beam": [d.token_ids for d in runs["token_beam_latentrag"]()]
        == [strip(r) for r in runs["token_beam_hf"]().tolist()],
        "sequence_thorough": [d.token_ids for d in thorough]
        == [strip(r) for r in runs["sequence_thorough_hf"]().tolist()],
    }
    token = alternate({n: runs[n] for n in ("token_beam_latentrag", "token_beam_hf")}, repeats)
    seq = alternate({n: runs[n] for n in ("sequence_thorough_latentrag", "sequence_thorough_hf",
                                          "sequence_fast_latentrag")}, repeats)
    t = token | seq

    def ratio(slow: str, fast: str) -> dict[str, float]:
        return {clock: round(t[slow][clock] / t[fast][clock], 2)
                for clock in ("wall", "cpu", "wall_median", "cpu_median")}

    return {
        "setting": dict(model=f"random BART-{size}",
                        params_m=round(sum(p.numel() for p in gen.model.parameters()) / 1e6, 1),
                        questions=questions, k=k, beams=beams, max_new_tokens=max_new,
                        context_tokens=batch.input_ids.shape[1], length_penalty=1.0, repeats=repeats,
                        sequence_candidates=[d.candidates for d in thorough]),
        "outputs_equal_hf": same,
        "seconds": {n: {c: round(v, 4) for c, v in times.items()} for n, times in t.items()},
        "speedup_token_beam_vs_hf": ratio("token_beam_hf", "token_beam_latentrag"),
        "speedup_sequence_thorough_vs_hf": ratio("sequence_thorough_hf", "sequence_thorough_latentrag"),
        "speedup_fast_vs_thorough": ratio("sequence_thorough_latentrag", "sequence_fast_latentrag"),
    }


@torch.inference_mode()
def smollm2_throughput(questions: int, k: int, max_new: int, beams: int, repeats: int, cases: tuple[str, ...]) -> dict:
    """Generated answer tokens per second of the default generator, k passages per question: end to end
    (prompt prefill included) and decoding only (after the prefill)."""
    from latentrag.generation.decoding import start_answers
    from latentrag.generation.generators import load_generator

    gen = load_generator("smollm2")
    gen.model.eval()
    docs = passages(questions * k)
    batch = gen.prepare(QUESTIONS[:questions], [docs[b * k : (b + 1) * k] for b in range(questions)])
    log_prior = retrieval_log_prior(torch.randn(questions, k, generator=torch.Generator().manual_seed(0)))
    out = {"setting": dict(questions=questions, k=k, max_new_tokens=max_new, beams=beams,
                           prompt_tokens=batch.input_ids.shape[1], repeats=repeats)}
    runs = {
        "token_greedy": lambda: rag_token_decode(gen, batch, log_prior, DecodeOptions(max_new, num_beams=1)),
        "token_beam": lambda: rag_token_decode(gen, batch, log_prior, DecodeOptions(max_new, num_beams=beams)),
        "sequence_fast": lambda: rag_sequence_decode(gen, batch, log_prior, DecodeOptions(max_new, num_beams=beams),
                                                     "fast"),
        "sequence_thorough": lambda: rag_sequence_decode(gen, batch, log_prior,
                                                         DecodeOptions(max_new, num_beams=beams), "thorough"),
    }
    from latentrag.generation.decoding import TokenMarginal, search

    def greedy_phases() -> tuple[float, float, int]:
        start = time.perf_counter()
        state, first = start_answers(gen, batch)
        mid = time.perf_counter()
        hyps = search(gen, state, first, TokenMarginal(log_prior.float()), questions,
                      DecodeOptions(max_new, num_beams=1))
        return mid - start, time.perf_counter() - mid, int(hyps.lengths.sum())

    phases = [greedy_phases() for _ in range(repeats)]
    prefill = min(p[0] for p in phases)
    best = min(phases, key=lambda p: p[0] + p[1])
    out["prefill_seconds"] = round(prefill, 3)
    out["token_greedy"] = {"seconds": round(best[0] + best[1], 3), "answer_tokens": best[2],
                           "tokens_per_s": round(best[2] / (best[0] + best[1]), 2),
                           "decode_tokens_per_s": round(best[2] / best[1], 2)}
    for name in cases:
        if name == "token_greedy":
            continue
        times, decoded = timed(runs[name], repeats)
        tokens = sum(len(d.token_ids) for d in decoded)
        seconds = min(t[0] for t in times)
        out[name] = {"seconds": round(seconds, 3), "answer_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 2),
                     "decode_tokens_per_s": round(tokens / max(seconds - prefill, 1e-9), 2)}
        if name.startswith("sequence"):
            out[name]["candidates"] = [d.candidates for d in decoded]
    if "sequence_fast" in out and "sequence_thorough" in out:
        out["speedup_fast_vs_thorough"] = round(out["sequence_thorough"]["seconds"] / out["sequence_fast"]["seconds"], 2)
    return out


def write_results(result: dict, command: str, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    hf, smol = result["versus_hf"], result["smollm2"]
    s = hf["setting"]
    lines = [
        f"# Decoding benchmark ({name})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}; torch threads {result['threads']}; shared with other jobs. Best (min) of "
        f"{s['repeats']} alternating runs; medians in the JSON.",
        "",
        f"Against Hugging Face `RagTokenForGeneration` / `RagSequenceForGeneration` on the same {s['model']} "
        f"weights ({s['params_m']}M parameters, 49,152-token vocabulary), {s['questions']} questions × k={s['k']} "
        f"Wikipedia passages ({s['context_tokens']} context tokens), {s['beams']} beams, {s['max_new_tokens']} new "
        f"tokens, length_penalty 1.0. Outputs identical to HF: {hf['outputs_equal_hf']}.",
        "",
        "| decoding | latentrag wall / CPU (s) | Hugging Face wall / CPU (s) | speed-up wall / CPU |",
        "|---|---|---|---|",
    ]
    sec = hf["seconds"]

    def cell(name: str) -> str:
        return f"{sec[name]['wall']} / {sec[name]['cpu']}"

    def speed(key: str) -> str:
        return f"{hf[key]['wall']}× / {hf[key]['cpu']}×"

    lines += [
        f"| RAG-Token beam | {cell('token_beam_latentrag')} | {cell('token_beam_hf')} | "
        f"{speed('speedup_token_beam_vs_hf')} |",
        f"| RAG-Sequence thorough | {cell('sequence_thorough_latentrag')} | {cell('sequence_thorough_hf')} | "
        f"{speed('speedup_sequence_thorough_vs_hf')} |",
        f"| RAG-Sequence fast | {cell('sequence_fast_latentrag')} | — | "
        f"{speed('speedup_fast_vs_thorough')} vs thorough |",
        "",
        f"RAG-Sequence candidates per question (distinct hypotheses of {s['k']}×{s['beams']} beams): "
        f"{s['sequence_candidates']}. Random weights barely read the passage, so the beams of different passages "
        "largely coincide and thorough decoding has few (y, z) pairs left to score.",
        "",
        f"Default generator (SmolLM2-135M-Instruct, fp32), {smol['setting']['questions']} question(s), "
        f"k={smol['setting']['k']} ({smol['setting']['prompt_tokens']} prompt tokens per passage row, prefill "
        f"{smol['prefill_seconds']} s), max {smol['setting']['max_new_tokens']} new tokens, "
        f"{smol['setting']['beams']} beams where beams apply:",
        "",
        "| decoding | seconds | answer tokens | tokens/s end to end | tokens/s after prefill |",
        "|---|---|---|---|---|",
    ]
    for case in ("token_greedy", "token_beam", "sequence_fast", "sequence_thorough"):
        if case in smol:
            c = smol[case]
            lines.append(f"| {case.replace('_', ' ')} | {c['seconds']} | {c['answer_tokens']} | {c['tokens_per_s']} | "
                         f"{c['decode_tokens_per_s']} |")
    if "speedup_fast_vs_thorough" in smol:
        lines += ["", f"RAG-Sequence fast vs thorough with the default generator (real passages, so the beams of "
                      f"different passages differ: {smol['sequence_thorough']['candidates']} candidates from "
                      f"{smol['setting']['k']}×{smol['setting']['beams']} beams): "
                      f"{smol['speedup_fast_vs_thorough']}× (wall)."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats (under a minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine two threads are oversubscribed and "
                             "timings scatter by ±100%%; one thread repeats within a few %%)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.quick:
        versus = versus_hf("small", questions=1, k=5, beams=4, max_new=8, repeats=3)
        smol = smollm2_throughput(questions=1, k=5, max_new=6, beams=4, repeats=1, cases=("token_greedy",))
    else:
        versus = versus_hf("base", questions=2, k=5, beams=4, max_new=16, repeats=5)
        smol = smollm2_throughput(questions=1, k=5, max_new=16, beams=4, repeats=2,
                                  cases=("token_greedy", "token_beam", "sequence_fast", "sequence_thorough"))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
        "threads": threads,
        "quick": args.quick,
        "versus_hf": versus,
        "smollm2": smol,
    }
    command = "python benchmarks/decoding.py" + (" --quick" if args.quick else "") + (
        f" --threads {threads}" if threads != 1 else "")
    if not args.no_write:
        write_results(result, command, "decoding-quick" if args.quick else "decoding")
    figures = {
        "outputs_equal_hf": all(versus["outputs_equal_hf"].values()),
        "speedup_token_beam_vs_hf": versus["speedup_token_beam_vs_hf"]["wall"],
        "speedup_sequence_thorough_vs_hf": versus["speedup_sequence_thorough_vs_hf"]["wall"],
        "speedup_fast_vs_thorough": versus["speedup_fast_vs_thorough"]["wall"],
        "cpu_speedups": {key: versus[key]["cpu"] for key in (
            "speedup_token_beam_vs_hf", "speedup_sequence_thorough_vs_hf", "speedup_fast_vs_thorough")},
        "smollm2_k5_prefill_s": smol["prefill_seconds"],
    }
    if "speedup_fast_vs_thorough" in smol:
        figures["smollm2_k5_speedup_fast_vs_thorough"] = smol["speedup_fast_vs_thorough"]
    for case in ("token_greedy", "token_beam", "sequence_fast", "sequence_thorough"):
        if case in smol:
            figures[f"smollm2_k5_{case}_tokens_per_s"] = smol[case]["tokens_per_s"]
            figures[f"smollm2_k5_{case}_decode_tokens_per_s"] = smol[case]["decode_tokens_per_s"]
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
