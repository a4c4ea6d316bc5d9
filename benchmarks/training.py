"""Training speed: a latentrag training step against its floor and against Hugging Face, measured in one run.

    python benchmarks/training.py --quick      # BART-small shape; then the default models, one step each
    python benchmarks/training.py              # BART-base shape, more repeats: benchmarks/results/training.{json,md}

A step is what `latentrag train` does per optimiser step (`training.trainer`): `Objective` (= `RagModel.forward`,
−log p(y|x) under RAG-Token, eq. 3/4) with retrieval from a real flat `DenseIndex` at every step, backward,
gradient clipping and the trainer's AdamW (`_optimizer`), generator and query tower fully trained.

1. RAG overhead: examples/s of our step vs the floor, the generator's own forward+backward (`labels=`, HF's
   cross-entropy) and the same optimiser step, on the already-formatted B·k rows of the same batch (same padded
   lengths), without retrieval, query tower or marginalisation. overhead = ours/floor − 1 (goal ≤ 15 %).
2. Hugging Face `RagTokenForGeneration` (n_docs = k) on the same modules (so identical weights), the same
   questions, answers and index: its question encoder, the top-k of the same flat index, its own
   `RagRetriever.postprocess_docs` (contexts padded to `max_combined_length`, 300, as its retriever does),
   doc_scores = q·d as `RagModel.forward` computes them (so its gradient reaches the question tower), then
   forward(labels=...) + backward + the same clipping and optimiser step. Also HF fed contexts padded to
   our length, which isolates the implementation from the padding. Per-example losses of both are
   checked equal (eval mode) before anything is timed. Goal: ≥ 1.5× (ours over HF).
3. The default models (bundled MiniLM towers + SmolLM2-135M, through the trainer's `build_model`): seconds per
   step and peak resident memory, one child process per setting so peaks do not mix.

Shapes: random BART (49,152-token vocabulary, `decoding.py`'s tokenizer) with a DPR question tower of the
matching BERT shape (BERT-base for BART-base); B = 4 questions, k = 5 wiki-leads passages of ≥ 95 words.
The index holds random vectors for those passages (no document tower is run): retrieval cost is the
flat search plus `reconstruct` of the top-k, as for any flat index of that size. Timings alternate between
the arms with a settle pause before each, threads fixed; read the ratios, the machine is shared.
The last line printed is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decoding import QUESTIONS, SIZES, bart_style_tokenizer, passages  # noqa: E402

from latentrag.threads import configure_threads  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ANSWERS = ["Leo Tolstoy", "Jupiter", "July 20, 1969", "iron", "Leonardo da Vinci", "Canberra", "nine", "the Nile"]
TOWERS = {  # DPR question towers of the BERT shape that goes with each BART size
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
# BLAS/OpenMP worker threads keep spinning briefly after a call returns: pause before each timed call
SETTLE_S = 0.25
HF_MAX_COMBINED_LENGTH = 300  # transformers' RagConfig default: its retriever pads every context to this


# ---- timing -------------------------------------------------------------------------------------------
def alternate(fns: dict, repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
    """Wall and CPU seconds of each function over `repeats` rounds taken in turns (a, b, c, a, b, c, ...), a
    settle pause before each call, after one untimed warm-up call each: min and median. Also the results of
    the warm-up calls."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    first = {name: fn() for name, fn in fns.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: {"wall": min(t[0] for t in ts), "cpu": min(t[1] for t in ts),
                   "wall_median": statistics.median(t[0] for t in ts),
                   "cpu_median": statistics.median(t[1] for t in ts)}
            for name, ts in samples.items()}, first


def ratios(t: dict, slow: str, fast: str) -> dict[str, float]:
    return {clock: round(t[slow][clock] / t[fast][clock], 3) for clock in ("wall", "cpu", "wall_median", "cpu_median")}


# ---- the seq2seq comparison ---------------------------------------------------------------------------
def random_parts(size: str, seed: int = 0):
    """(question tower, BART generator, flat index over random vectors of ≥95-word wiki-leads passages)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertTokenizerFast,
        DPRConfig,
        DPRQuestionEncoder,
    )

    from latentrag.assets import minilm_dir
    from latentrag.generation.generators import Seq2SeqGenerator
    from latentrag.retrieval.encoders import DenseEncoder
    from latentrag.retrieval.index import build_index_from_vectors

    tokenizer = bart_style_tokenizer()
    config = BartConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, **SIZES[size])
    torch.manual_seed(seed)
    bart = BartForConditionalGeneration(config)
    generator = Seq2SeqGenerator(bart, tokenizer, f"random-bart-{size}", max_input_length=512)
    q_tokenizer = BertTokenizerFast.from_pretrained(minilm_dir())  # BERT's uncased WordPiece vocabulary
    dpr = DPRQuestionEncoder(DPRConfig(vocab_size=len(q_tokenizer), **TOWERS[size]))
    tower = DenseEncoder(dpr, q_tokenizer, "pooler", False, 64, f"random-dpr-question-{size}")
    docs = passages(2790)  # every wiki-leads passage of ≥ 95 words (100-word splits)
    dim = TOWERS[size]["hidden_size"]
    vectors = np.random.default_rng(seed).standard_normal((len(docs), dim), dtype=np.float32) / np.sqrt(dim)
    identity = {"name": f"random-dpr-context-{size}", "sha256": f"random-vectors-seed-{seed}", "dim": dim,
                "pooling": "pooler", "normalize": False}
    root = Path(tempfile.mkdtemp(prefix="latentrag-train-bench-"))
    index = build_index_from_vectors(vectors, docs, root / "index", identity)
    return tower, generator, index, identity


def hf_contexts(hf, tokenizer, questions: list[str], passages_: list, max_length: int):
    """HF's own `RagRetriever.postprocess_docs` (format "title / text // question", pad to max_length)."""
    from transformers import RagRetriever

    docs = [{"title": [p.title for p in row], "text": [p.text for p in row]} for row in passages_]
    shim = SimpleNamespace(config=SimpleNamespace(title_sep=hf.config.title_sep, doc_sep=hf.config.doc_sep,
                                                  max_combined_length=max_length),
                           generator_tokenizer=tokenizer)
    return RagRetriever.postprocess_docs(shim, docs, questions, None, len(passages_[0]), return_tensors="pt")


def versus(size: str, k: int, batch_size: int, repeats: int) -> dict:
    from transformers import RagConfig as HFRagConfig
    from transformers import RagTokenForGeneration

    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.retriever import Retriever
    from latentrag.training import TrainSettings
    from latentrag.training.trainer import Objective, _optimizer, _train_mode

    tower, generator, index, identity = random_parts(size)
    model = RagModel(Retriever(tower, identity, index), generator, RagConfig(mode="token", k=k))
    # full fine-tuning of the generator and the query tower, as build_model does with lora_rank = 0
    model.requires_grad_(False)
    generator.model.requires_grad_(True)
    tower.model.requires_grad_(True)
    settings = TrainSettings(train="-", out="-", k=k, lora_rank=0, query_lora_rank=0)
    objective = Objective(model, "token", k, closed_book=False)
    optimizer, scheduler = _optimizer(model, settings, total_steps=10_000)
    trainable = [p for p in model.parameters() if p.requires_grad]
    floor_optimizer, floor_scheduler = _optimizer(generator.model, settings, total_steps=10_000)
    floor_params = [p for p in generator.model.parameters() if p.requires_grad]

    hf_config = HFRagConfig.from_question_encoder_generator_configs(tower.model.config, generator.model.config,
                                                                    n_docs=k)
    hf = RagTokenForGeneration(hf_config, question_encoder=tower.model, generator=generator.model)
    assert hf.rag.generator is generator.model and hf.rag.question_encoder is tower.model  # identical weights
    start = generator.model.config.decoder_start_token_id

    batches = [(QUESTIONS[i : i + batch_size], ANSWERS[i : i + batch_size])
               for i in range(0, len(QUESTIONS) - batch_size + 1, batch_size)]
    # the floor's inputs: the very rows our step builds for each batch (same B·k rows, same padding)
    floor_inputs = []
    with torch.no_grad():
        for questions, answers in batches:
            retrieved = model.retrieve(questions, k)
            b = generator.prepare(retrieved.questions, retrieved.passages, answers)
            labels = b.targets.masked_fill(b.target_mask == 0, -100).repeat_interleave(k, dim=0)
            floor_inputs.append((b.input_ids, b.attention_mask, labels))
    lengths = {"latentrag_context_tokens": [f[0].shape[1] for f in floor_inputs],
               "hf_context_tokens": HF_MAX_COMBINED_LENGTH}

    def step(loss: torch.Tensor, params, opt, sched) -> float:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    def hf_loss(questions, answers, max_length: int | None) -> torch.Tensor:
        q_tok = tower.tokenize(questions)
        q = hf.question_encoder(**q_tok)[0]  # (B,d): as RagModel.forward
        _, ids = index.search(q.detach().float().numpy(), k)
        doc_embeds = torch.from_numpy(index.reconstruct(ids)).to(q.dtype)
        doc_scores = torch.bmm(q.unsqueeze(1), doc_embeds.transpose(1, 2)).squeeze(1)
        rows = index.passages(ids)
        length = max_length or generator.prepare(questions, rows).input_ids.shape[1]
        context_input_ids, context_attention_mask = hf_contexts(hf, generator.tokenizer, questions, rows, length)
        targets = generator.tokenizer(text_target=list(answers), padding=True, return_tensors="pt")["input_ids"]
        decoder_input_ids = torch.cat([targets.new_full((len(answers), 1), start), targets], dim=1)
        return hf(context_input_ids=context_input_ids, context_attention_mask=context_attention_mask,
                  doc_scores=doc_scores, decoder_input_ids=decoder_input_ids, labels=decoder_input_ids,
                  reduce_loss=False, n_docs=k).loss  # (B,): −log p(y|x) per question

    # the same computation first: per-example losses equal in eval mode (no dropout), HF at both lengths
    model.eval()
    with torch.no_grad():
        checks = {}
        for questions, answers in batches:
            ours = objective(questions, answers)
            for name, length in (("hf_300", HF_MAX_COMBINED_LENGTH), ("hf_same_length", None)):
                theirs = hf_loss(questions, answers, length)
                checks.setdefault(name, []).append(float((ours - theirs).abs().max() / ours.abs().max()))
    losses_equal = {name: max(v) < 1e-4 for name, v in checks.items()}
    if not all(losses_equal.values()):
        raise SystemExit(f"latentrag and HF losses differ (max relative difference {checks}): nothing timed")

    _train_mode(model)  # generator in train mode (dropout), towers in eval mode, as the trainer runs
    hf.question_encoder.eval()
    turn: dict[str, int] = {}

    def batch_of(name: str):  # each arm walks through the batches in the same order
        i = turn.setdefault(name, 0)
        turn[name] = i + 1
        return i % len(batches)

    def ours_step() -> float:
        questions, answers = batches[batch_of("ours")]
        return step(objective(questions, answers).mean(), trainable, optimizer, scheduler)

    def floor_step() -> float:
        input_ids, attention_mask, labels = floor_inputs[batch_of("floor")]
        loss = generator.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        return step(loss, floor_params, floor_optimizer, floor_scheduler)

    def hf_step(max_length: int | None, name: str):
        def run() -> float:
            questions, answers = batches[batch_of(name)]
            return step(hf_loss(questions, answers, max_length).mean(), trainable, optimizer, scheduler)
        return run

    t, first = alternate({"latentrag": ours_step, "floor": floor_step,
                          "hf_300": hf_step(HF_MAX_COMBINED_LENGTH, "hf_300"),
                          "hf_same_length": hf_step(None, "hf_same_length")}, repeats)
    overhead = {clock: round(t["latentrag"][clock] / t["floor"][clock] - 1, 3)
                for clock in ("wall", "cpu", "wall_median", "cpu_median")}
    return {
        "setting": dict(model=f"random BART-{size}", question_tower=f"random DPR (BERT-{size} shape)",
                        generator_params_m=round(sum(p.numel() for p in generator.model.parameters()) / 1e6, 1),
                        tower_params_m=round(sum(p.numel() for p in tower.model.parameters()) / 1e6, 1),
                        vocab=len(generator.tokenizer), index_passages=len(index), batch_size=batch_size, k=k,
                        mode="token", repeats=repeats, optimizer="AdamW (trainer's _optimizer), clip 1.0",
                        **lengths),
        "losses_equal_hf": losses_equal,
        "max_relative_loss_difference": {n: max(v) for n, v in checks.items()},
        "first_step_losses": {n: round(v, 4) for n, v in first.items()},
        "seconds": {n: {c: round(v, 4) for c, v in times.items()} for n, times in t.items()},
        "examples_per_s": {n: round(batch_size / times["wall"], 3) for n, times in t.items()},
        "rag_overhead_vs_floor": overhead,
        "speedup_vs_hf_300": ratios(t, "hf_300", "latentrag"),
        "speedup_vs_hf_same_length": ratios(t, "hf_same_length", "latentrag"),
    }


# ---- the default models, one child process per setting ------------------------------------------------
def _scale_shim() -> None:
    """`build_model` sets requires_grad on the retriever's scale (issue 9, item 3), which may not have landed
    on this branch yet: then give the class an inert, unregistered one so the trainer's own set-up runs."""
    from latentrag.retrieval.retriever import Retriever

    if "log_scale" not in inspect.getsource(Retriever):
        Retriever.log_scale = torch.nn.Parameter(torch.zeros(()), requires_grad=False)


def child(setting: dict, index_dir: str, steps: int) -> dict:
    """Build the default model as `latentrag train` does and time `steps` training steps; peak RSS after."""
    from latentrag.retrieval.index import DenseIndex
    from latentrag.training import TrainSettings
    from latentrag.training.trainer import Objective, _optimizer, _train_mode, build_model

    _scale_shim()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = TrainSettings(train="-", out="-", index=index_dir, **setting)
    started = time.perf_counter()
    model = build_model(s, DenseIndex.load(index_dir), torch.device("cpu"))
    load_s = time.perf_counter() - started
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    objective = Objective(model, s.mode, s.k, closed_book=False)
    optimizer, scheduler = _optimizer(model, s, total_steps=1000)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _train_mode(model)
    seconds, prompt_tokens = [], []
    for i in range(steps):
        questions = [QUESTIONS[(i * s.batch_size + j) % len(QUESTIONS)] for j in range(s.batch_size)]
        answers = [ANSWERS[(i * s.batch_size + j) % len(ANSWERS)] for j in range(s.batch_size)]
        retrieved = model.retrieve(questions, s.k)
        with torch.no_grad():
            prompt_tokens.append(model.generator.prepare(questions, retrieved.passages).input_ids.shape[1])
        t0 = time.perf_counter()
        loss = objective(questions, answers).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setting": setting, "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
            "load_s": round(load_s, 1), "seconds_per_step": [round(x, 2) for x in seconds],
            "prompt_tokens": prompt_tokens, "peak_rss_gib": round(peak / 2**30, 2),
            "rss_after_load_gib": round(loaded / 2**30, 2), "rss_at_start_gib": round(before / 2**30, 2)}


def default_index(log) -> tuple[str, str]:
    """The bundled wiki-leads index if it is built; else a small one over the first passages (said so)."""
    from latentrag.cli import default_index_dir
    from latentrag.retrieval.corpus import read_corpus, split_passages
    from latentrag.retrieval.encoders import DenseEncoder, freeze
    from latentrag.retrieval.index import MANIFEST, build_index

    directory = default_index_dir()
    if (directory / MANIFEST).exists():
        return str(directory), f"bundled {directory.name}"
    n = 200
    log(f"no bundled index at {directory}: building one over the first {n} wiki-leads passages")
    out = Path(tempfile.mkdtemp(prefix="latentrag-train-bench-")) / "index"
    docs = [p for _, p in zip(range(n), split_passages(read_corpus("wiki-leads"), words=100), strict=False)]
    build_index(docs, freeze(DenseEncoder.from_pretrained("minilm")), out, progress=False)
    return str(out), f"small stand-in: first {n} wiki-leads passages (the bundled index was not built)"


def default_models(settings: list[dict], steps: int, threads: int, log) -> dict:
    index_dir, index_note = default_index(log)
    runs = []
    for setting in settings:
        log(f"default models: {setting}, {steps} step(s)")
        cmd = [sys.executable, __file__, "--child", json.dumps(setting), "--index", index_dir, "--steps", str(steps),
               "--threads", str(threads)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            runs.append({"setting": setting, "error": f"child exited {done.returncode}"})
            continue
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"index": index_note, "steps": steps, "runs": runs}


# ---- results ------------------------------------------------------------------------------------------
def write_results(result: dict, command: str, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training benchmark ({name})", "", f"Command: `{command}`  ",
             f"Machine: {result['machine']}; torch threads {result['threads']}; a loaded machine shared with other "
             "jobs: read the ratios, the absolute figures are from a busy CPU.", ""]
    v = result.get("versus")
    if v:
        s = v["setting"]
        sec, ex = v["seconds"], v["examples_per_s"]
        lines += [
            f"One RAG-Token training step (forward + backward + clipping + AdamW; generator and query tower fully "
            f"trained) on {s['model']} ({s['generator_params_m']}M parameters, {s['vocab']:,}-token vocabulary) "
            f"with a {s['question_tower']} question tower ({s['tower_params_m']}M), B={s['batch_size']} questions, "
            f"k={s['k']} wiki-leads passages of ≥ 95 words, retrieval from a flat index of {s['index_passages']:,} "
            f"passages. Best (min) of {s['repeats']} alternating runs after a warm-up; medians in the JSON.",
            "",
            f"Inputs: latentrag pads the B·k contexts to the longest row ({s['latentrag_context_tokens']} tokens for "
            f"the batches used); Hugging Face's retriever pads every context to `max_combined_length` "
            f"({s['hf_context_tokens']}); 'HF, same length' is HF given contexts padded to latentrag's length. "
            f"Per-example losses equal to HF's before timing: {v['losses_equal_hf']} (max relative difference "
            f"{max(v['max_relative_loss_difference'].values()):.1e}).",
            "",
            "| step | wall / CPU (s) | examples/s | latentrag is |",
            "|---|---|---|---|",
            f"| latentrag (`Objective`, retrieval included) | {sec['latentrag']['wall']} / {sec['latentrag']['cpu']} | "
            f"{ex['latentrag']} | — |",
            f"| floor: the generator alone (`labels=`), same rows | {sec['floor']['wall']} / {sec['floor']['cpu']} | "
            f"{ex['floor']} | overhead {v['rag_overhead_vs_floor']['wall']:+.1%} wall / "
            f"{v['rag_overhead_vs_floor']['cpu']:+.1%} CPU (goal ≤ +15 %) |",
            f"| HF `RagTokenForGeneration`, contexts padded to {s['hf_context_tokens']} | {sec['hf_300']['wall']} / "
            f"{sec['hf_300']['cpu']} | {ex['hf_300']} | {v['speedup_vs_hf_300']['wall']}× / "
            f"{v['speedup_vs_hf_300']['cpu']}× faster (goal ≥ 1.5×) |",
            f"| HF `RagTokenForGeneration`, same length as latentrag | {sec['hf_same_length']['wall']} / "
            f"{sec['hf_same_length']['cpu']} | {ex['hf_same_length']} | {v['speedup_vs_hf_same_length']['wall']}× / "
            f"{v['speedup_vs_hf_same_length']['cpu']}× faster |",
            "",
        ]
    d = result.get("default_models")
    if d:
        lines += [
            f"Default models (bundled MiniLM query tower + SmolLM2-135M-Instruct, fp32, CPU, `build_model` defaults), "
            f"B=4 questions, index: {d['index']}; {d['steps']} step(s) per setting, each setting in its own process "
            "(peak RSS of that process). The first step includes one-time allocation.",
            "",
            "| setting | trainable params (M) | prompt tokens per row | s/step | peak RSS (GiB) | RSS after load (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in d["runs"]:
            s = r["setting"]
            label = (f"LoRA r={s['lora_rank']}" if s.get("lora_rank") else "full fine-tuning") + f", k={s['k']}"
            if "error" in r:
                lines.append(f"| {label} | {r['error']} | | | | |")
                continue
            lines.append(f"| {label} | {r['trainable_params_m']} | {r['prompt_tokens']} | "
                         f"{' / '.join(str(x) for x in r['seconds_per_step'])} | {r['peak_rss_gib']} | "
                         f"{r['rss_after_load_gib']} |")
        lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="BART-small shape, few repeats, 1 default-model step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--no-default-models", action="store_true", help="skip the default-model step costs")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one default-model setting (JSON), in its own process
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.index, args.steps)))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
              "threads": threads, "quick": args.quick}
    log("latentrag vs floor vs Hugging Face")
    result["versus"] = versus("small" if args.quick else "base", k=5, batch_size=4, repeats=3 if args.quick else 5)
    result["versus_seconds"] = round(time.perf_counter() - started, 1)
    if not args.no_default_models:
        settings = [dict(lora_rank=16, k=5), dict(lora_rank=0, k=5), dict(lora_rank=16, k=3)]
        result["default_models"] = default_models(settings, 1 if args.quick else 3, threads, log)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    command = "python benchmarks/training.py" + (" --quick" if args.quick else "") + (
        f" --threads {threads}" if threads != 1 else "") + (" --no-default-models" if args.no_default_models else "")
    if not args.no_write:
        write_results(result, command, "training-quick" if args.quick else "training")
    v = result["versus"]
    figures = {"rag_overhead_vs_floor": v["rag_overhead_vs_floor"]["wall"],
               "speedup_vs_hf_300": v["speedup_vs_hf_300"]["wall"],
               "speedup_vs_hf_same_length": v["speedup_vs_hf_same_length"]["wall"],
               "losses_equal_hf": all(v["losses_equal_hf"].values()),
               "versus_seconds": result["versus_seconds"], "total_seconds": result["total_seconds"]}
    for r in result.get("default_models", {}).get("runs", []):
        if "error" not in r:
            s = r["setting"]
            key = f"smollm2_{'lora' + str(s['lora_rank']) if s['lora_rank'] else 'full'}_k{s['k']}"
            figures[key] = {"s_per_step": r["seconds_per_step"][-1], "peak_rss_gib": r["peak_rss_gib"]}
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
