"""Training speed: a latentrag training step against its floor and against Hugging Face, measured in one run.

    python benchmarks/training.py --quick      # small shapes (about 1 CPU-minute), then the default models, 1 step each
    python benchmarks/training.py --quick --no-default-models   # the comparisons alone: under two minutes
    python benchmarks/training.py              # BART-base / SmolLM2 shapes, 5 repeats, 3 default-model steps each

Results: benchmarks/results/training{-quick}.{json,md}. The default-model part is slow on a CPU (SmolLM2 at
B=4, k=5 is tens of CPU-seconds per step and ~10 GiB of activations): a --quick run takes ~10 minutes with it.

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


# ---- the comparisons ----------------------------------------------------------------------------------
LLAMA_SIZES = {  # random Llama shapes with SmolLM2's tokenizer; "base" is SmolLM2-135M's own configuration
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=768, head_dim=64),
    "base": {},
}


def random_retrieval(size: str, seed: int = 0):
    """(DPR question tower of the BERT-`size` shape, flat index over random vectors of ≥95-word wiki-leads
    passages, the identity of the document tower those vectors stand for)."""
    from transformers import BertTokenizerFast, DPRConfig, DPRQuestionEncoder

    from latentrag.assets import minilm_dir
    from latentrag.retrieval.encoders import DenseEncoder
    from latentrag.retrieval.index import build_index_from_vectors

    q_tokenizer = BertTokenizerFast.from_pretrained(minilm_dir())  # BERT's uncased WordPiece vocabulary
    torch.manual_seed(seed + 1)
    dpr = DPRQuestionEncoder(DPRConfig(vocab_size=len(q_tokenizer), **TOWERS[size]))
    tower = DenseEncoder(dpr, q_tokenizer, "pooler", False, 64, f"random-dpr-question-{size}")
    docs = passages(2790)  # every wiki-leads passage of ≥ 95 words (100-word splits)
    dim = TOWERS[size]["hidden_size"]
    vectors = np.random.default_rng(seed).standard_normal((len(docs), dim), dtype=np.float32) / np.sqrt(dim)
    identity = {"name": f"random-dpr-context-{size}", "sha256": f"random-vectors-seed-{seed}", "dim": dim,
                "pooling": "pooler", "normalize": False}
    root = Path(tempfile.mkdtemp(prefix="latentrag-train-bench-"))
    return tower, build_index_from_vectors(vectors, docs, root / "index", identity), identity


def random_generator(kind: str, size: str, seed: int = 0):
    """A random BART (seq2seq) or Llama (decoder-only) of the given shape, with a 49,152-token vocabulary."""
    from latentrag.generation.generators import DecoderOnlyGenerator, Seq2SeqGenerator

    torch.manual_seed(seed)
    if kind == "seq2seq":
        from transformers import BartConfig, BartForConditionalGeneration

        tokenizer = bart_style_tokenizer()
        config = BartConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, **SIZES[size])
        return Seq2SeqGenerator(BartForConditionalGeneration(config), tokenizer, f"random-bart-{size}", 512)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from latentrag.assets import smollm2_dir

    config = LlamaConfig.from_pretrained(smollm2_dir(), **LLAMA_SIZES[size])
    return DecoderOnlyGenerator(LlamaForCausalLM(config), AutoTokenizer.from_pretrained(smollm2_dir()),
                                f"random-llama-{size}", 512)


def floor_loss(generator, batch):
    """The generator's own loss on the rows our step builds (same B·k rows, same padding), as a plain
    fine-tuning script computes it: no retrieval, no query tower, no marginalisation."""
    k = batch.k
    answers = batch.targets.repeat_interleave(k, dim=0)
    answer_mask = batch.target_mask.repeat_interleave(k, dim=0)
    labels = answers.masked_fill(answer_mask == 0, -100)
    if generator.kind == "seq2seq":  # BART's own `labels=` path (its cross-entropy over the vocabulary)
        return lambda: generator.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       labels=labels).loss
    # decoder-only: prompt + answer rows, logits only where the answer is predicted (as any efficient script)
    width = batch.input_ids.shape[1]
    input_ids = torch.cat([batch.input_ids, answers[:, :-1]], dim=1)
    mask = torch.cat([batch.attention_mask, answer_mask[:, :-1]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def loss() -> torch.Tensor:
        logits = generator.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 logits_to_keep=input_ids.shape[1] - (width - 1)).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    return loss


def hf_contexts(hf, tokenizer, questions: list[str], passages_: list, max_length: int):
    """HF's own `RagRetriever.postprocess_docs` (format "title / text // question", pad to max_length)."""
    from transformers import RagRetriever

    docs = [{"title": [p.title for p in row], "text": [p.text for p in row]} for row in passages_]
    shim = SimpleNamespace(config=SimpleNamespace(title_sep=hf.config.title_sep, doc_sep=hf.config.doc_sep,
                                                  max_combined_length=max_length),
                           generator_tokenizer=tokenizer)
    return RagRetriever.postprocess_docs(shim, docs, questions, None, len(passages_[0]), return_tensors="pt")


def versus(kind: str, size: str, k: int, batch_size: int, repeats: int) -> dict:
    """Our step vs the floor; for seq2seq also vs Hugging Face's RAG-Token on the same modules."""
    from latentrag.model import RagConfig, RagModel
    from latentrag.retrieval.retriever import Retriever
    from latentrag.training import TrainSettings
    from latentrag.training.trainer import Objective, _optimizer, _train_mode

    tower, index, identity = random_retrieval(size)
    generator = random_generator(kind, size)
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

    batches = [(QUESTIONS[i : i + batch_size], ANSWERS[i : i + batch_size])
               for i in range(0, len(QUESTIONS) - batch_size + 1, batch_size)]
    floors, lengths = [], []  # the floor's inputs: the very rows our step builds for each batch
    with torch.no_grad():
        for questions, answers in batches:
            retrieved = model.retrieve(questions, k)
            b = generator.prepare(retrieved.questions, retrieved.passages, answers)
            floors.append(floor_loss(generator, b))
            lengths.append(b.input_ids.shape[1])

    def step(loss: torch.Tensor, params, opt, sched) -> float:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    turn: dict[str, int] = {}

    def batch_of(name: str) -> int:  # each arm walks through the batches in the same order
        i = turn.setdefault(name, 0)
        turn[name] = i + 1
        return i % len(batches)

    def ours_step() -> float:
        questions, answers = batches[batch_of("ours")]
        return step(objective(questions, answers).mean(), trainable, optimizer, scheduler)

    def floor_step() -> float:
        return step(floors[batch_of("floor")](), floor_params, floor_optimizer, floor_scheduler)

    arms = {"latentrag": ours_step, "floor": floor_step}
    out: dict = {}
    if kind == "seq2seq":
        hf_arms, checks = hf_versus(model, objective, tower, generator, index, k, batches)
        out["losses_equal_hf"] = {name: v < 1e-4 for name, v in checks.items()}
        out["max_relative_loss_difference"] = checks
        if not all(out["losses_equal_hf"].values()):
            raise SystemExit(f"latentrag and HF losses differ (max relative difference {checks}): nothing timed")
        for name, hf_loss in hf_arms.items():
            def run(name=name, hf_loss=hf_loss) -> float:
                questions, answers = batches[batch_of(name)]
                return step(hf_loss(questions, answers).mean(), trainable, optimizer, scheduler)
            arms[name] = run

    _train_mode(model)  # generator in train mode (dropout), towers in eval mode, as the trainer runs
    t, first = alternate(arms, repeats)
    clocks = ("wall", "cpu", "wall_median", "cpu_median")
    params = {"generator_params_m": round(sum(p.numel() for p in generator.model.parameters()) / 1e6, 1),
              "tower_params_m": round(sum(p.numel() for p in tower.model.parameters()) / 1e6, 1)}
    out = {
        "setting": dict(generator=f"random {'BART' if kind == 'seq2seq' else 'Llama'}-{size}", kind=kind,
                        question_tower=f"random DPR (BERT-{size} shape)", **params, vocab=len(generator.tokenizer),
                        index_passages=len(index), batch_size=batch_size, k=k, mode="token", repeats=repeats,
                        optimizer="AdamW (trainer's _optimizer), clip 1.0", latentrag_context_tokens=lengths,
                        **({"hf_context_tokens": HF_MAX_COMBINED_LENGTH} if kind == "seq2seq" else {})),
        **out,
        "first_step_losses": {n: round(v, 4) for n, v in first.items()},
        "seconds": {n: {c: round(v, 4) for c, v in times.items()} for n, times in t.items()},
        "examples_per_s": {n: round(batch_size / times["wall"], 3) for n, times in t.items()},
        "rag_overhead_vs_floor": {c: round(t["latentrag"][c] / t["floor"][c] - 1, 3) for c in clocks},
    }
    if kind == "seq2seq":
        out["speedup_vs_hf_300"] = ratios(t, "hf_300", "latentrag")
        out["speedup_vs_hf_same_length"] = ratios(t, "hf_same_length", "latentrag")
    return out


def hf_versus(model, objective, tower, generator, index, k: int, batches: list) -> tuple[dict, dict]:
    """Hugging Face's RagTokenForGeneration over the very modules of `model` (identical weights): its loss
    functions at HF's context length (max_combined_length) and at ours, and their largest relative
    difference from our per-example losses (eval mode, no dropout)."""
    from transformers import RagConfig as HFRagConfig
    from transformers import RagTokenForGeneration

    hf_config = HFRagConfig.from_question_encoder_generator_configs(tower.model.config, generator.model.config,
                                                                    n_docs=k)
    hf = RagTokenForGeneration(hf_config, question_encoder=tower.model, generator=generator.model)
    assert hf.rag.generator is generator.model and hf.rag.question_encoder is tower.model  # identical weights
    start = generator.model.config.decoder_start_token_id

    def hf_loss(questions, answers, max_length: int | None) -> torch.Tensor:
        q = hf.question_encoder(**tower.tokenize(questions))[0]  # (B,d): as HF's RagModel.forward
        _, ids = index.search(q.detach().float().numpy(), k)  # the same flat index: HF's retriever's job
        doc_embeds = torch.from_numpy(index.reconstruct(ids)).to(q.dtype)
        doc_scores = torch.bmm(q.unsqueeze(1), doc_embeds.transpose(1, 2)).squeeze(1)  # as HF's RagModel
        rows = index.passages(ids)
        length = max_length or generator.prepare(questions, rows).input_ids.shape[1]  # ours: the longest row
        context_input_ids, context_attention_mask = hf_contexts(hf, generator.tokenizer, questions, rows, length)
        targets = generator.tokenizer(text_target=list(answers), padding=True, return_tensors="pt")["input_ids"]
        decoder_input_ids = torch.cat([targets.new_full((len(answers), 1), start), targets], dim=1)
        return hf(context_input_ids=context_input_ids, context_attention_mask=context_attention_mask,
                  doc_scores=doc_scores, decoder_input_ids=decoder_input_ids, labels=decoder_input_ids,
                  reduce_loss=False, n_docs=k).loss  # (B,): −log p(y|x) per question (see test_hf_parity)

    arms = {"hf_300": lambda q, a: hf_loss(q, a, HF_MAX_COMBINED_LENGTH),
            "hf_same_length": lambda q, a: hf_loss(q, a, None)}
    model.eval()
    checks: dict[str, float] = {}
    with torch.no_grad():
        for questions, answers in batches:
            ours = objective(questions, answers)
            for name, fn in arms.items():
                diff = float((ours - fn(questions, answers)).abs().max() / ours.abs().max())
                checks[name] = max(checks.get(name, 0.0), diff)
    hf.question_encoder.eval()
    return arms, checks


# ---- the default models, one child process per setting ------------------------------------------------
def _rss() -> int:
    """Resident memory of this process now (bytes)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def child(setting: dict, index_dir: str, steps: int) -> dict:
    """Build the default model as `latentrag train` does and time `steps` training steps; peak RSS after."""
    from latentrag.retrieval.index import DenseIndex
    from latentrag.training import TrainSettings
    from latentrag.training.trainer import Objective, _optimizer, _train_mode, build_model

    before = _rss()
    s = TrainSettings(train="-", out="-", index=index_dir, **setting)
    started = time.perf_counter()
    model = build_model(s, DenseIndex.load(index_dir), torch.device("cpu"))
    load_s = time.perf_counter() - started
    loaded = _rss()
    objective = Objective(model, s.mode, s.k, closed_book=False)
    optimizer, scheduler = _optimizer(model, s, total_steps=1000)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _train_mode(model)
    seconds, cpu, prompt_tokens = [], [], []
    for i in range(steps):
        questions = [QUESTIONS[(i * s.batch_size + j) % len(QUESTIONS)] for j in range(s.batch_size)]
        answers = [ANSWERS[(i * s.batch_size + j) % len(ANSWERS)] for j in range(s.batch_size)]
        retrieved = model.retrieve(questions, s.k)
        with torch.no_grad():
            prompt_tokens.append(model.generator.prepare(questions, retrieved.passages).input_ids.shape[1])
        t0, c0 = time.perf_counter(), time.process_time()
        loss = objective(questions, answers).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setting": setting, "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
            "load_s": round(load_s, 1), "seconds_per_step": [round(x, 2) for x in seconds],
            "cpu_seconds_per_step": [round(x, 2) for x in cpu],
            "prompt_tokens": prompt_tokens, "peak_rss_gib": round(peak / 2**30, 2),
            "rss_after_load_gib": round(loaded / 2**30, 2), "rss_at_start_gib": round(before / 2**30, 2)}


def default_index(log) -> tuple[str, str]:
    """The bundled wiki-leads index if it is built; else a small one over the first passages (said so)."""
    from latentrag.assets import default_index_dir
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
def _pct(x: float) -> str:
    return f"{x:+.1%}"


def write_results(result: dict, command: str, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training benchmark ({name})", "", f"Command: `{command}`  ",
             f"Machine: {result['machine']}; torch threads {result['threads']}. A loaded machine shared with other "
             "jobs (wall time was several times CPU time): read the ratios; absolute seconds are from a busy CPU. "
             f"The comparisons took {result['comparisons_seconds']} s wall, {result['comparisons_cpu_seconds']} s "
             f"CPU; the whole run {result['total_seconds']} s wall.", ""]
    v = result["versus"]
    s = v["setting"]
    sec, ex = v["seconds"], v["examples_per_s"]

    def cell(n: str) -> str:
        return f"{sec[n]['wall']} / {sec[n]['cpu']}"

    lines += [
        "## Seq2seq: latentrag vs its floor and vs Hugging Face RAG-Token", "",
        f"One RAG-Token training step (forward + backward + clipping + the trainer's AdamW; generator and query tower "
        f"fully trained) with {s['generator']} ({s['generator_params_m']}M parameters, {s['vocab']:,}-token "
        f"vocabulary) and a {s['question_tower']} question tower ({s['tower_params_m']}M), B={s['batch_size']} "
        f"questions, k={s['k']} wiki-leads passages of ≥ 95 words retrieved from a flat index of "
        f"{s['index_passages']:,} passages at every step. Best (min) of {s['repeats']} alternating runs after a "
        "warm-up; medians in the JSON.",
        "",
        f"Input lengths: latentrag pads the B·k contexts to the longest row ({s['latentrag_context_tokens']} tokens "
        f"for the batches used); Hugging Face's retriever pads every context to `max_combined_length` "
        f"({s['hf_context_tokens']}); 'HF, same length' is HF given contexts padded to latentrag's length. "
        f"Per-example losses equal to HF's before timing: {v['losses_equal_hf']} (max relative difference "
        f"{max(v['max_relative_loss_difference'].values()):.1e}).",
        "",
        "| step | wall / CPU (s) | examples/s (wall) | latentrag: overhead or speed-up, wall / CPU |",
        "|---|---|---|---|",
        f"| latentrag (`Objective` = `RagModel.forward`, retrieval included) | {cell('latentrag')} | "
        f"{ex['latentrag']} | — |",
        f"| floor: the generator alone (BART `labels=`), same rows | {cell('floor')} | {ex['floor']} | RAG overhead "
        f"{_pct(v['rag_overhead_vs_floor']['wall'])} / {_pct(v['rag_overhead_vs_floor']['cpu'])} (goal ≤ +15 %) |",
        f"| HF `RagTokenForGeneration`, contexts padded to {s['hf_context_tokens']} | {cell('hf_300')} | "
        f"{ex['hf_300']} | {v['speedup_vs_hf_300']['wall']}× / {v['speedup_vs_hf_300']['cpu']}× (goal ≥ 1.5×) |",
        f"| HF `RagTokenForGeneration`, same length as latentrag | {cell('hf_same_length')} | {ex['hf_same_length']} | "
        f"{v['speedup_vs_hf_same_length']['wall']}× / {v['speedup_vs_hf_same_length']['cpu']}× |",
        "",
    ]
    d = result.get("decoder_only")
    if d:
        s, sec = d["setting"], d["seconds"]
        lines += [
            "## Decoder-only: latentrag vs its floor", "",
            f"The same step with {s['generator']} ({s['generator_params_m']}M parameters, SmolLM2's tokenizer and "
            f"chat template) and the {s['question_tower']} tower; prompt rows of {s['latentrag_context_tokens']} "
            "tokens. Floor: the generator's forward on the same prompt + answer rows, logits only at the answer "
            "positions (as latentrag computes them), cross-entropy, backward, the same optimiser step.",
            "",
            "| step | wall / CPU (s) | examples/s (wall) | RAG overhead, wall / CPU |",
            "|---|---|---|---|",
            f"| latentrag | {sec['latentrag']['wall']} / {sec['latentrag']['cpu']} | {d['examples_per_s']['latentrag']} "
            "| — |",
            f"| floor | {sec['floor']['wall']} / {sec['floor']['cpu']} | {d['examples_per_s']['floor']} | "
            f"{_pct(d['rag_overhead_vs_floor']['wall'])} / {_pct(d['rag_overhead_vs_floor']['cpu'])} |",
            "",
        ]
    m = result.get("default_models")
    if m:
        lines += [
            "## Step cost of the default models on this CPU", "",
            "Bundled MiniLM query tower + SmolLM2-135M-Instruct, fp32, built by the trainer's `build_model` (LoRA on "
            "the generator and the query tower at the given rank; rank 0 = both fully trained), RAG-Token, B=4 "
            f"questions, one thread, index: {m['index']}. {m['steps']} step(s) per setting, each setting in its own "
            "process (its peak RSS); a first step includes one-time allocation. Absolute figures from a loaded "
            "machine: CPU seconds are the better guide to an idle core.",
            "",
            "| setting | trainable params (M) | prompt tokens per row | s/step wall | s/step CPU | peak RSS (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in m["runs"]:
            st = r["setting"]
            label = (f"LoRA r={st['lora_rank']}" if st.get("lora_rank") else "full fine-tuning") + f", k={st['k']}"
            if "error" in r:
                lines.append(f"| {label} | {r['error']} | | | | |")
                continue
            lines.append(f"| {label} | {r['trainable_params_m']} | {r['prompt_tokens']} | "
                         f"{' / '.join(str(x) for x in r['seconds_per_step'])} | "
                         f"{' / '.join(str(x) for x in r['cpu_seconds_per_step'])} | {r['peak_rss_gib']} |")
        lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="BART-small shape, few repeats, 1 default-model step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--no-default-models", action="store_true", help="skip the default-model step costs")
    parser.add_argument("--no-decoder-only", action="store_true", help="skip the decoder-only floor comparison")
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
    size, repeats = ("small", 3) if args.quick else ("base", 5)
    log(f"seq2seq (BART-{size} shape): latentrag vs floor vs Hugging Face")
    result["versus"] = versus("seq2seq", size, k=5, batch_size=4, repeats=repeats)
    result["versus_seconds"] = round(time.perf_counter() - started, 1)
    if not args.no_decoder_only:
        log(f"decoder-only (Llama-{size} shape): latentrag vs floor")
        result["decoder_only"] = versus("decoder-only", size, k=5, batch_size=4, repeats=repeats)
    result["comparisons_seconds"] = round(time.perf_counter() - started, 1)
    result["comparisons_cpu_seconds"] = round(time.process_time(), 1)
    if not args.no_default_models:
        settings = [dict(lora_rank=16, k=5), dict(lora_rank=16, k=3), dict(lora_rank=0, k=5)]  # largest last
        result["default_models"] = default_models(settings, 1 if args.quick else 3, threads, log)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    command = "python benchmarks/training.py" + (" --quick" if args.quick else "") + (
        f" --threads {threads}" if threads != 1 else "") + (" --no-decoder-only" if args.no_decoder_only else "") + (
        " --no-default-models" if args.no_default_models else "")
    if not args.no_write:
        write_results(result, command, "training-quick" if args.quick else "training")
    v = result["versus"]
    figures = {"rag_overhead_vs_floor": v["rag_overhead_vs_floor"]["wall"],
               "speedup_vs_hf_300": v["speedup_vs_hf_300"]["wall"],
               "speedup_vs_hf_same_length": v["speedup_vs_hf_same_length"]["wall"],
               "losses_equal_hf": all(v["losses_equal_hf"].values()),
               "comparisons_seconds": result["comparisons_seconds"], "total_seconds": result["total_seconds"]}
    if "decoder_only" in result:
        figures["decoder_only_rag_overhead_vs_floor"] = result["decoder_only"]["rag_overhead_vs_floor"]["wall"]
    for r in result.get("default_models", {}).get("runs", []):
        if "error" not in r:
            s = r["setting"]
            key = f"smollm2_{'lora' + str(s['lora_rank']) if s['lora_rank'] else 'full'}_k{s['k']}"
            figures[key] = {"s_per_step": r["seconds_per_step"][-1], "cpu_s_per_step": r["cpu_seconds_per_step"][-1],
                            "peak_rss_gib": r["peak_rss_gib"]}
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
