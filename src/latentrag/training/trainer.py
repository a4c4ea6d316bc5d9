"""End-to-end fine-tuning (paper §2.4): the query tower and the generator trained jointly on (x, y) pairs by
minimising −log p(y|x) under RAG-Sequence or RAG-Token (eq. 4), with no supervision on which passage to
retrieve. The document tower and the index stay frozen; the top-k are re-retrieved with the current query
tower at every step.

    settings = TrainSettings(train="nq-dev,trivia-dev", out="runs/rag-token", mode="token", k=5, steps=600)
    model_dir = train(settings)          # runs/rag-token/model: a RagModel folder (LoRA adapters + config)

One step = `grad_accum` micro-batches of `batch_size` questions per process, AdamW, linear warmup then
linear decay, gradient clipping. Under `torchrun --nproc-per-node N` each process takes its slice of
every micro-batch and DDP averages the gradients, so N processes of batch b train as one of batch N·b.
Checkpoints (`checkpoints.py`) every `save_every` steps make `--resume` continue bit for bit on CPU.

Deliberate choices, each one the paper leaves open:
* The query tower runs without dropout during training. With dropout the top-k of the same question
  changes from step to step and p(z|x) is trained on a noisy ranking; retrieval should be a function of
  the question. The document tower is always in eval mode (frozen).
* Validation and generation run in eval mode; training mode is restored afterwards.
* The target is a gold answer the index states (`data.stated_targets`; `--target first`: the first listed,
  as Hugging Face's RAG fine-tuning scripts).
* Modes "concat" and "fid" read all k passages at once: their loss −log p_θ(y|x,z_1..z_k) does not contain
  p(z|x), so the query tower gets no gradient from it. Training them keeps the query tower (and the
  retrieval scale) frozen, as --freeze-query-encoder would, and trains the generator alone; asking to learn
  the retrieval scale with them is refused. (Frozen, not left to receive no gradient: DDP refuses
  parameters that never get one, and LoRA adapters on the tower would be saved untrained.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from latentrag.atomic import atomic_write_text
from latentrag.errors import LatentRagError
from latentrag.training import checkpoints as ckpt
from latentrag.training.curves import plot_learning_curve, read_log
from latentrag.training.data import ExampleStream, TrainPair, load_pairs, split_validation, stated_targets
from latentrag.training.validation import closed_book_loss, collapse_warning, validate

RUN, LOG, CURVE, MODEL = "run.json", "log.jsonl", "learning_curve.png", "model"
# settings that may change when a run is resumed: they do not change the weights
_RESUMABLE = {"eval_every", "save_every", "keep_checkpoints"}
_BEFORE = {"target": "first"}  # what a run.json written before a setting existed ran with


@dataclass
class TrainSettings:
    """One training run, as plain values (saved as run.json; a resumed run must match them)."""

    train: str  # "nq-dev,trivia-dev" or a .jsonl/.tsv of questions and answers
    out: str
    mode: str = "token"  # "token", "sequence", "concat" or "fid" (concat/fid: the query tower stays frozen)
    k: int = 5
    steps: int | None = None  # optimiser steps; or
    epochs: float | None = None  # passes over the training pairs (default: 1)
    batch_size: int = 4  # questions per micro-batch per process
    grad_accum: int = 1
    lr: float | None = None  # default: 3e-4 with LoRA, 3e-5 for full fine-tuning
    warmup: int | None = None  # steps of linear warm-up (default: 6 % of the steps)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    label_smoothing: float | None = None  # default: the model's (0)
    lora_rank: int = 16  # LoRA on the generator; 0 = full fine-tuning
    query_lora_rank: int | None = None  # LoRA on the query tower (default: lora_rank; 0 = train it fully)
    freeze_query_encoder: bool = False  # the paper's "frozen retriever" ablation
    retrieval_scale: float | None = None  # s in p(z|x) ∝ exp(s·d(z)ᵀq(x)) to start from (default: the model's)
    learn_retrieval_scale: bool = False
    scale_lr: float | None = None  # a learning rate of its own for log s (default: the LoRA/full rate)
    reading_filter: bool = False  # train only on questions whose answer is in the k passages read (reading.py)
    counterfactual: float = 0.0  # share of those whose passages are rewritten to a same-type substitute
    rescore_counterfactuals: bool = False  # re-encode the rewritten passages and score them (reading.reencode)
    gold_within: int | None = None  # read the best gold passage among the first N when the k hold none
    closed_book: bool = False  # the generator alone, no retrieval: the parametric-only baseline
    answerable_only: bool = False  # keep questions with a gold answer in some passage of the index
    target: str = "stated"  # "stated": a gold answer the index (and, when read, the passages) states; "first"
    val: str | None = None  # a held-out file; default: a fraction of the training data
    val_fraction: float = 0.02
    val_questions: int = 100  # validation questions used at each evaluation
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None  # "cpu" or "cuda" (default: cuda when available)
    precision: str = "auto"  # "fp32", "bf16" (autocast), "auto" = bf16 on CUDA, fp32 on CPU
    max_new_tokens: int = 16  # validation answers
    # the model to start from: a saved RagModel folder, or base components (names or folders)
    model: str | None = None
    index: str | None = None  # default: the bundled wiki-leads index
    query_encoder: str | None = None
    document_encoder: str | None = None
    generator: str | None = None
    max_input_length: int | None = None
    prompt: str | None = None  # a decoder-only generator's prompt style, "full" or "compact" (default: the model's)

    def check(self) -> None:
        from latentrag.rag_types import rag_type

        kind = rag_type(self.mode)  # an unknown mode is refused here
        if self.learn_retrieval_scale and not kind.latent:
            raise LatentRagError(f"--learn-retrieval-scale: mode '{self.mode}' reads all k passages at once, so "
                                 "p(z|x) is not in its loss and the scale would get no gradient")
        positive = {"k": self.k, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "save_every": self.save_every, "val_questions": self.val_questions,
                    "max_new_tokens": self.max_new_tokens, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if value < 1:
                raise LatentRagError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.steps is not None and self.epochs is not None:
            raise LatentRagError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise LatentRagError("--steps and --epochs must be positive")
        if self.lora_rank < 0 or (self.query_lora_rank or 0) < 0:
            raise LatentRagError("LoRA ranks must be 0 (full fine-tuning) or positive")
        if self.lr is not None and self.lr <= 0 or self.warmup is not None and self.warmup < 0:
            raise LatentRagError("--lr must be positive and --warmup non-negative")
        if self.retrieval_scale is not None and self.retrieval_scale <= 0:
            raise LatentRagError(f"--retrieval-scale must be positive, got {self.retrieval_scale}")
        if self.scale_lr is not None and self.scale_lr <= 0:
            raise LatentRagError(f"--scale-lr must be positive, got {self.scale_lr}")
        if self.scale_lr is not None and not self.learn_retrieval_scale:
            raise LatentRagError("--scale-lr is the learning rate of a learned scale: add --learn-retrieval-scale")
        if not 0.0 <= self.counterfactual <= 1.0:
            raise LatentRagError(f"--counterfactual is a share between 0 and 1, got {self.counterfactual}")
        if self.closed_book and (self.reading_filter or self.counterfactual or self.gold_within):
            raise LatentRagError("--reading-filter, --counterfactual and --gold-within need passages: not with "
                                 "--closed-book")
        if self.rescore_counterfactuals and not self.counterfactual:
            raise LatentRagError("--rescore-counterfactuals scores rewritten passages: add --counterfactual")
        if self.gold_within is not None and self.gold_within <= self.k:
            raise LatentRagError(f"--gold-within is a depth beyond the k = {self.k} passages read, got "
                                 f"{self.gold_within}")
        if self.target not in ("stated", "first"):
            raise LatentRagError(f"--target is stated or first, got '{self.target}'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LatentRagError(f"--precision is auto, fp32 or bf16, got '{self.precision}'")
        if self.device not in (None, "cpu", "cuda"):
            raise LatentRagError(f"--device is cpu or cuda, got '{self.device}'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LatentRagError("--device cuda, but no CUDA device is available")
        if self.model and any((self.query_encoder, self.generator)):
            raise LatentRagError("--model starts from a saved model: do not also name its query encoder or "
                                 "generator (--document-encoder names the index's tower for a Hugging Face RAG "
                                 "checkpoint)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.lora_rank else 3e-5)


# ---- the objective ------------------------------------------------------------------------------------
class Objective(nn.Module):
    """What a step minimises, per question: −log p(y|x) (eq. 4) under RAG-Sequence or RAG-Token — exactly
    `RagModel.forward` — or, closed-book, −log p_θ(y|x) of the generator alone. DDP wraps this module."""

    def __init__(self, model, mode: str, k: int, closed_book: bool, gold_within: int | None = None,
                 rescore: bool = False):
        super().__init__()
        self.model, self.mode, self.k, self.closed_book = model, mode, k, closed_book
        self.depth, self.rescore = gold_within, rescore

    def forward(self, questions: list[str], answers: list[str], rewrites=None, golds=None) -> torch.Tensor:
        """`rewrites[j]` (counterfactual augmentation, `reading.py`): (golds, substitute) to rewrite in question
        j's retrieved passages before they are read, or None; with `rescore`, the rewritten passages are
        re-encoded and scored (`reading.reencode`). `golds[j]` (with gold_within): question j's answers,
        whose best passage among the first gold_within is read when the top k hold none."""
        if self.closed_book:
            return closed_book_loss(self.model, questions, answers, self.mode)
        reach = self.depth is not None and golds is not None and any(golds)
        if not reach and (not rewrites or not any(rewrites)):
            return self.model(questions, answers, mode=self.mode, k=self.k)
        from latentrag.training.reading import reach_gold, reencode, rewrite_passages

        retrieved = (reach_gold(self.model.retrieve(questions, self.depth), self.k, golds) if reach
                     else self.model.retrieve(questions, self.k))
        if rewrites:
            passages = [ps if r is None else rewrite_passages(ps, r)
                        for ps, r in zip(retrieved.passages, rewrites, strict=True)]
            if self.rescore:
                retrieved = reencode(self.model, retrieved, passages)
            else:
                retrieved.passages = passages
        return self.model(questions, answers, mode=self.mode, retrieved=retrieved)


# ---- set-up -------------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("LATENTRAG_DDP_BACKEND")
                                != "gloo" else "gloo")
    return dist.get_rank(), world


def _check_out(out: Path, settings: dict, resume: bool) -> None:
    """Refuse, before any work, an output folder that holds another run or other files."""
    if out.exists() and not out.is_dir():
        raise LatentRagError(f"--out {out} is a file: give a folder for the run")
    run_file = out / RUN
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if not resume:
            raise LatentRagError(f"{out} already holds a training run: pass --resume to continue it, or choose "
                                 "another --out")
        previous = {**_BEFORE, **previous}
        changed = sorted(k for k in settings if k not in _RESUMABLE and previous.get(k) != settings[k])
        if changed:
            raise LatentRagError(
                f"{out} holds a run with other settings ({', '.join(f'{k}: {previous.get(k)!r} → {settings[k]!r}' for k in changed[:4])}): "
                "resume with the settings it started with, or choose another --out"
            )
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise LatentRagError(f"{out} is a non-empty folder that holds no training run: choose a new or empty --out")


def _resolve_index(name: str | None):
    from latentrag.retrieval.index import DenseIndex

    if name is None:
        from latentrag.retrieval.index import default_index

        return DenseIndex.load(default_index())
    return DenseIndex.load(name)




def load_data(s: TrainSettings, index) -> tuple[list[TrainPair], list[TrainPair], dict]:
    """Training and validation pairs (answerable filter first, then the split) and what was kept."""
    if s.val and {Path(part).expanduser().resolve() for part in s.train.split(",")} & {Path(s.val).expanduser().resolve()}:
        raise LatentRagError(f"--train and --val name the same file ({s.val}): validate on held-out questions "
                             "(another file, or no --val to hold out --val-fraction of the training data)")
    pairs = load_pairs(s.train)
    info = {"train_questions_total": len(pairs)}
    val = load_pairs(s.val) if s.val else None
    finder = None
    if index is not None and (s.answerable_only or s.target == "stated"):
        from latentrag.evaluation.evaluate import AnswerFinder

        finder = AnswerFinder(p.text for p in index.store)
    if s.target == "stated" and finder is not None:
        pairs = stated_targets(pairs, finder)
        val = stated_targets(val, finder) if val is not None else None
    info["targets"] = "stated" if s.target == "stated" and finder is not None else "first"
    if s.answerable_only:
        pairs = [p for p in pairs if finder.contains(p.answers)]
        val = [p for p in val if finder.contains(p.answers)] if val is not None else None
        info["train_questions_answerable"] = len(pairs)
        if not pairs:
            raise LatentRagError(f"no question of {s.train} has its answer in a passage of the index")
        if val is not None and not val:
            raise LatentRagError(f"no question of --val {s.val} has its answer in a passage of the index: give "
                                 "another --val, or no --val (a held-out fraction of the training data)")
    if val is None:
        pairs, val = split_validation(pairs, s.val_fraction, s.seed)
    else:
        val_questions = {p.question for p in val}
        pairs = [p for p in pairs if p.question not in val_questions]  # never validate on a training question
        if not pairs:
            raise LatentRagError(f"every training question is also in --val {s.val}: validate on held-out questions")
    info.update({"train_questions": len(pairs), "validation_questions": len(val),
                 "validation_questions_used": min(len(val), s.val_questions)})
    return pairs, val[: s.val_questions], info


def build_model(s: TrainSettings, index, device: torch.device):
    """The model to train: built with the run's settings (mode, k, label smoothing, input length, retrieval
    scale) from the start, then LoRA adapters and trainable parts chosen by `RagModel.set_trainable`."""
    from latentrag.model import RagModel

    overrides = {"mode": s.mode, "k": s.k, "learn_retrieval_scale": s.learn_retrieval_scale}
    optional = {"label_smoothing": s.label_smoothing, "max_input_length": s.max_input_length,
                "retrieval_scale": s.retrieval_scale, "prompt": s.prompt}
    overrides.update({key: value for key, value in optional.items() if value is not None})
    if s.model:
        extra = {"document_encoder": s.document_encoder} if s.document_encoder else {}
        model = RagModel.from_pretrained(s.model, index=index, **extra, **overrides)
    else:
        names = {"query_encoder": s.query_encoder, "document_encoder": s.document_encoder, "generator": s.generator}
        model = RagModel.from_components(index=index, **{k: v for k, v in names.items() if v}, **overrides)
    from latentrag.rag_types import rag_type

    kind = rag_type(s.mode)
    kind.check_generator(model.generator)  # fid needs a seq2seq generator
    query_rank = s.lora_rank if s.query_lora_rank is None else s.query_lora_rank
    reads_latent = kind.latent and not s.closed_book  # concat/fid: p(z|x) is not in the loss, no gradient reaches it
    model.set_trainable(generator=s.lora_rank,
                        query_encoder=query_rank if reads_latent and not s.freeze_query_encoder else None,
                        retrieval_scale=s.learn_retrieval_scale and reads_latent)
    return model.to(device)


def _check_world(out: Path, world: int, resume: bool) -> None:
    """A resumed run keeps its number of processes: another would silently change the global batch."""
    run_file = out / RUN
    if not resume or not run_file.is_file():
        return
    previous = json.loads(run_file.read_text()).get("world_size", 1)
    if previous != world:
        raise LatentRagError(f"{out} was trained with {previous} process(es) and is resumed with {world}: that "
                             "would change the global batch; resume with "
                             + ("`torchrun --nproc-per-node " + str(previous) + "`" if previous > 1 else "one process")
                             + ", or start a new --out")


def _optimizer(model: nn.Module, s: TrainSettings, total_steps: int):
    """AdamW; log s gets its own group when `scale_lr` is set (one scalar moves little at the LoRA rate)."""
    decay, no_decay, scale = [], [], []
    own_rate = model.retriever.log_scale if s.scale_lr is not None else None
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scale if p is own_rate else no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scale:
        groups.append({"params": scale, "weight_decay": 0.0, "lr": s.scale_lr})
    optimizer = torch.optim.AdamW(groups, lr=s.learning_rate)
    warmup = s.warmup if s.warmup is not None else max(1, round(0.06 * total_steps))

    def schedule(step: int) -> float:  # linear warm-up to lr, then linear decay to 0 at the last step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _train_mode(model) -> None:
    """Training mode for the generator; the towers stay in eval mode (no dropout in retrieval, see above)."""
    model.train()  # leaves the frozen document tower in eval mode
    model.retriever.eval()


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_log(path: Path, step: int) -> list[dict]:
    """Keep the log up to `step` (a resumed run rewrites what came after its checkpoint)."""
    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


# ---- the loop -----------------------------------------------------------------------------------------
def train(settings: TrainSettings, resume: bool = False, progress: bool = True) -> Path:
    """Train and return the folder of the final model (`out/model`, loadable with `RagModel.from_pretrained`)."""
    from tqdm.auto import tqdm

    s = settings
    s.check()
    out = Path(s.out).expanduser()
    record = {k: v for k, v in asdict(s).items() if k != "out"}
    _check_out(out, record, resume)
    rank, world = _distributed()
    _check_world(out, world, resume)
    main = rank == 0
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda")

    index = None if s.closed_book and not s.answerable_only and s.index is None else _resolve_index(s.index)
    train_pairs, val_pairs, info = load_data(s, index)
    if index is not None and s.k > len(index):
        raise LatentRagError(f"--k {s.k} is larger than the index ({len(index)} passages)")
    global_batch = s.batch_size * world * s.grad_accum
    total_steps = s.steps or max(1, math.ceil((s.epochs or 1.0) * len(train_pairs) / global_batch))

    random.seed(s.seed)
    torch.manual_seed(s.seed)
    model = build_model(s, index, device)
    objective = Objective(model, s.mode, s.k, s.closed_book, s.gold_within, s.rescore_counterfactuals)
    optimizer, scheduler = _optimizer(model, s, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LatentRagError("nothing to train: every part is frozen")
    step, position, elapsed = 0, 0, 0.0
    log_path = out / LOG
    saved = ckpt.checkpoints(out)
    if resume and saved:
        _, state = ckpt.load_newest(out, lambda path: ckpt.load_checkpoint(path, model, optimizer, scheduler), saved)
        step, position, elapsed = state["step"], state["position"], state.get("elapsed", 0.0)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RUN, json.dumps({**record, "data": info, "total_steps": total_steps,
                                                 "world_size": world, "global_batch": global_batch}, indent=2))
        _truncate_log(log_path, step)
    if s.rescore_counterfactuals:
        model.document_encoder()  # loaded before DDP wraps the objective that runs it
    wrapped = objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
        # (every trainable parameter gets a gradient: LoRA and `DenseEncoder.requires_grad_` leave unused poolers frozen)
    stream = ExampleStream(train_pairs, s.seed, position)
    selector = _selector(s, model, train_pairs, main and progress)
    trainable_count = sum(p.numel() for p in trainable)
    if main and not s.closed_book and not s.freeze_query_encoder and s.mode in ("concat", "fid"):
        print(f"mode {s.mode}: p(z|x) is not in the loss, so the query tower gets no gradient and stays frozen",
              file=sys.stderr)
    if main:
        print(f"training {trainable_count:,} parameters for {total_steps} steps of {global_batch} questions "
              f"({len(train_pairs)} training, {len(val_pairs)} validation questions) → {out}", file=sys.stderr)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    _train_mode(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    started = time.perf_counter() - elapsed
    running = None
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            step_loss, drawn, used, rewritten, reached = 0.0, 0, 0, 0, 0
            for micro in range(s.grad_accum):
                chosen = selector.take(stream, s.batch_size * world)  # every rank chooses the same global batch
                mine = slice(rank * s.batch_size, (rank + 1) * s.batch_size)
                drawn, used = drawn + chosen.drawn, used + len(chosen.pairs)
                rewritten += chosen.stats.get("counterfactual", 0)
                reached += chosen.stats.get("reached", 0)
                sync = world == 1 or micro == s.grad_accum - 1
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
                    loss = wrapped([p.question for p in chosen.pairs[mine]], chosen.targets[mine],
                                   chosen.rewrites[mine], chosen.golds[mine] if chosen.golds else None).mean()
                (loss / s.grad_accum).backward()
                step_loss += loss.item() / s.grad_accum
            if not math.isfinite(step_loss):
                raise LatentRagError(f"the loss became {step_loss} at step {step + 1}: lower --lr, or resume from "
                                     "the last checkpoint with other settings")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = step_loss if running is None else 0.9 * running + 0.1 * step_loss
            seconds = time.perf_counter() - t0
            bar.set_postfix(loss=f"{running:.3f}", ex_s=f"{global_batch / seconds:.2f}",
                            **({"kept": f"{used / drawn:.2f}"} if selector.active else {}))
            bar.update(1)
            if main:
                _append_log(log_path, {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                       "grad_norm": grad_norm, "examples": stream.position, "epoch": stream.epoch,
                                       "seconds": seconds, "scale": model.retriever.scale,
                                       **({"kept": used / drawn, "counterfactual": rewritten} if selector.active
                                          else {}), **({"reached": reached} if s.gold_within else {})})
            if step % s.eval_every == 0 or step == total_steps:
                if main:
                    _validate(model, val_pairs, s, step, log_path, bar)
                    _train_mode(model)
                _barrier(world)
            if step % s.save_every == 0 or step == total_steps:
                if main:
                    ckpt.save_checkpoint(out, step, model, optimizer, scheduler,
                                         {"position": stream.position, "elapsed": time.perf_counter() - started},
                                         keep=s.keep_checkpoints)
                _barrier(world)
    finally:
        bar.close()
    if main:
        model.save_pretrained(out / MODEL)
        plot_learning_curve(read_log(log_path), out / CURVE, title=f"{out.name}: {_title(s.mode)}"
                            + (" closed-book" if s.closed_book else f", k={s.k}"))
        print(f"trained model: {out / MODEL}  (learning curve: {out / CURVE})", file=sys.stderr)
    _barrier(world)
    return out / MODEL


def _selector(s: TrainSettings, model, train_pairs, progress: bool):
    """What each step trains on: the stream as it comes, or filtered / rewritten for reading (`reading.py`)."""
    from latentrag.training.reading import ReadingSelector, build_substitutes

    substitutes = None
    if s.counterfactual:
        substitutes = build_substitutes(train_pairs, model.document_encoder(), progress=progress)
    return ReadingSelector(model, s.k, s.reading_filter, s.counterfactual, substitutes, s.seed, s.gold_within,
                           read_targets=s.target == "stated")


def _title(mode: str) -> str:
    from latentrag.rag_types import rag_type

    return rag_type(mode).title


def _validate(model, val_pairs, s: TrainSettings, step: int, log_path: Path, bar) -> None:
    """Validate, log, and warn if retrieval is collapsing (over every validation of the run so far)."""
    metrics = validate(model, val_pairs, s.mode, s.k, max_new_tokens=s.max_new_tokens, closed_book=s.closed_book)
    _append_log(log_path, {"step": step, "val": metrics})
    shown = {key: round(v, 3) for key, v in metrics.items() if key in ("exact_match", "loss", "recall@5",
                                                                        "reading_exact_match", "prior_entropy",
                                                                        "distinct_top1")}
    bar.write(f"step {step}: validation {shown}")
    history = [r["val"] for r in read_log(log_path) if "val" in r]
    message = collapse_warning(history)
    if message:
        warnings.warn(message, stacklevel=2)
        bar.write(f"warning: {message}")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """A saved RagModel (`out`) from one checkpoint of a run (default: its newest), e.g. the step that
    validated best, or a run stopped early; the run's settings rebuild the model the checkpoint fits."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RUN).is_file():
        raise LatentRagError(f"{run_dir} holds no training run (no {RUN})")
    saved = ckpt.checkpoints(run_dir)
    chosen = [p for p in saved if step is None or p.name == f"{ckpt.PREFIX}{step:06d}"]
    if not chosen:
        raise LatentRagError(f"{run_dir} has no checkpoint{'' if step is None else f' at step {step}'}: it has "
                             f"{', '.join(p.name for p in saved) or 'none'}")
    s = settings_from({**json.loads((run_dir / RUN).read_text()), "out": str(run_dir)})
    index = None if s.closed_book and s.index is None else _resolve_index(s.index)
    model = build_model(s, index, torch.device("cpu"))
    if step is None:  # the newest intact checkpoint (a damaged newer one is skipped, with a warning)
        ckpt.load_newest(run_dir, lambda path: ckpt.load_trainable(path, model), chosen)
    else:
        ckpt.load_trainable(chosen[-1], model)
    model.save_pretrained(out)
    return Path(out)


def settings_from(values: dict) -> TrainSettings:
    """TrainSettings from a dict (the CLI's, or a run.json), ignoring keys it does not know."""
    known = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in values.items() if k in known})
