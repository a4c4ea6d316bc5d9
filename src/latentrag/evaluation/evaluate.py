"""Evaluation as the paper reports it: open-domain QA (EM, F1, answer recall@k), generation (BLEU, ROUGE-L,
Q-BLEU-1, distinct-n) and classification (label accuracy), for RAG-Token, RAG-Sequence, the two readers of
all k passages at once (concatenation, Fusion-in-Decoder) and the closed-book ("parametric only") baseline
that uses the same generator with no passages.

    settings = EvalSettings(dataset="nq-test", mode="token", k=5, answerable_only=True, limit=500)
    metrics = evaluate(model, settings, out_dir="runs/nq-token")   # predictions.jsonl, metrics.json, report.md
    metrics = rescore("runs/nq-token/predictions.jsonl")            # re-score without generating

A run appends its predictions in batches (flushed and fsynced), so an interrupted run continues with
`resume=True`, skipping the questions already answered; metrics and report are written atomically at the
end. With the 10k-passage default corpus only some questions can be answered from the index:
`answerable_only` keeps those with a gold answer in some passage (DPR's `has_answer`), and every output
says so and how many questions remain.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from latentrag.assets import cache_dir
from latentrag.atomic import atomic_write_text
from latentrag.defaults import MAX_NEW_TOKENS
from latentrag.errors import LatentRagError
from latentrag.evaluation import metrics as M
from latentrag.evaluation.datasets import DATASETS, QAExample, load_dataset

PREDICTIONS, METRICS, RUN, REPORT = "predictions.jsonl", "metrics.json", "run.json", "report.md"
RECALL_KS = (1, 5, 10, 20)


@dataclass
class EvalSettings:
    """What one evaluation run is: data, model type, decoding. Plain values, saved as run.json."""

    dataset: str
    mode: str | None = None  # "token", "sequence", "concat" or "fid" (`rag_types`); None: the model's; ignored when closed_book
    decoding: str | None = None  # None: the mode's default (RAG-Sequence thorough, the others greedy)
    num_beams: int | None = None  # None: the decoding's default (1 for greedy, else the model's)
    k: int | None = None  # None: the model's
    closed_book: bool = False
    max_new_tokens: int | None = None  # None: the model's
    batch_size: int = 4
    answerable_only: bool = False
    limit: int | None = None
    recall_ks: tuple[int, ...] = RECALL_KS
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("k", "batch_size", "max_new_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LatentRagError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not self.closed_book and self.decoding is None and self.mode is not None:
            from latentrag.rag_types import rag_type

            kind = rag_type(self.mode)
            self.decoding = getattr(kind, "default_decoding", None) or kind.decodings[0]
        self.recall_ks = tuple(self.recall_ks)

    def resolved(self, config=None) -> EvalSettings:
        """These settings with what was left to the model filled from its `RagConfig` (mode, k,
        max_new_tokens, beams), so a saved model answers as it was trained unless told otherwise; what
        run.json records is what ran."""
        from latentrag.model import RagConfig

        config = config or RagConfig()
        settings = replace(
            self,
            mode=self.mode or config.mode,
            k=config.k if self.k is None else self.k,
            max_new_tokens=config.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
        )
        if not settings.closed_book and settings.num_beams is None and settings.decoding != "greedy":
            settings.num_beams = config.num_beams
        return settings

    @property
    def label(self) -> str:
        if self.closed_book:
            return "closed-book"
        beams = f", {self.num_beams} beams" if self.num_beams and self.num_beams > 1 else ""
        if self.mode is None or self.k is None:
            return "RAG (the model's settings)"  # before `resolved`
        from latentrag.rag_types import rag_type

        return f"{rag_type(self.mode).title} ({self.decoding}{beams}, k={self.k})"

    def key(self) -> dict:
        """What must match for `resume` to continue a run (batch size and extras may change)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("extra")
        d["recall_ks"] = list(self.recall_ks)
        return d


# ---- answerable questions ---------------------------------------------------------------------------
class AnswerFinder:
    """Does a gold answer occur in some passage of a collection? DPR's `has_answer`, fast over many questions.

    Each passage is tokenised once (DPR's tokenizer) into " tok tok ... " — tokens never contain spaces,
    so token-sequence containment is substring containment of " a b c ". An inverted index (token ->
    passages) narrows each answer to the passages holding its rarest token. Regex answers (CuratedTrec)
    are searched over all passages joined, and each hit is confirmed on its own passage.
    """

    _SEP = "\n\x00\n"

    def __init__(self, texts: Iterable[str]):
        self.texts = list(texts)
        self._joined: list[str] = []
        self._postings: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            tokens = M.dpr_tokens(text)
            self._joined.append(" " + " ".join(tokens) + " ")
            for t in set(tokens):
                self._postings.setdefault(t, []).append(i)
        self._big: str | None = None
        self._starts: list[int] = []

    def _passage_at(self, position: int) -> int:
        return bisect.bisect_right(self._starts, position) - 1

    def _regex_contains(self, patterns: Sequence[str]) -> bool:
        import regex as regex_lib

        if self._big is None:
            parts, start = [], 0
            for text in self.texts:
                self._starts.append(start)
                nfd = unicodedata.normalize("NFD", text)
                parts.append(nfd)
                start += len(nfd) + len(self._SEP)
            self._big = self._SEP.join(parts)
        for pattern in patterns:
            try:
                compiled = regex_lib.compile(
                    unicodedata.normalize("NFD", pattern),
                    flags=regex_lib.IGNORECASE | regex_lib.UNICODE | regex_lib.MULTILINE,
                )
            except Exception:  # as DPR: a pattern that does not compile matches nothing
                continue
            position = 0
            while (m := compiled.search(self._big, position)) is not None:
                # The hit's passage is searched on its own (exact: a hit spanning two passages is not
                # one); if it has no match, no later match starts inside it, so go on from the next.
                i = self._passage_at(m.start())
                if M.has_answer(self.texts[i], [pattern], regex=True):
                    return True
                if i + 1 >= len(self._starts):
                    break
                position = self._starts[i + 1]
        return False

    def passages_with(self, golds: M.Golds) -> list[int]:
        """Every passage (by position) holding one of the answer strings, in order (not for regex answers)."""
        golds = [golds] if isinstance(golds, str) else list(golds)
        found: set[int] = set()
        for answer in golds:
            tokens = M.dpr_tokens(answer)
            if not tokens:
                continue
            candidates = min((self._postings.get(t, ()) for t in set(tokens)), key=len)
            needle = " " + " ".join(tokens) + " "
            found.update(i for i in candidates if needle in self._joined[i])
        return sorted(found)

    def written(self, answer: str, rows: Sequence[int] | None = None, sample: int = 20) -> str:
        """The answer as the passages holding it write it (`metrics.form_in_texts` over the first `sample` of
        `rows`, default: every passage that holds it)."""
        rows = self.passages_with([answer]) if rows is None else rows
        return M.form_in_texts(answer.strip(), [self.texts[i] for i in rows[:sample]])

    def stated(self, golds: Sequence[str]) -> str | None:
        """The gold answer as this collection states it: the first listed when some passage holds it, else the
        one most passages hold (ties: the earlier listed), written as those passages write it; None when no
        passage holds any. DPR's TriviaQA lists aliases in no useful order — "🚁" for helicopters, "Colonel
        (Australia)", "Eisenhower Dwight" — so what a model is trained toward (`training.data.stated_targets`)
        and what a knowledge swap writes into and out of the passages is the form running text uses."""
        held = [self.passages_with([g]) for g in golds]
        if not any(held):
            return None
        best = 0 if held[0] else max(range(len(golds)), key=lambda i: (len(held[i]), -i))
        return self.written(golds[best], held[best])

    def contains(self, golds: M.Golds, regex: bool = False) -> bool:
        golds = [golds] if isinstance(golds, str) else list(golds)
        return self._regex_contains(golds) if regex else bool(self.passages_with(golds))


def _examples_key(examples: Sequence[QAExample]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.id, ex.question, ex.answers, ex.regex], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _store_key(index) -> str:
    """Identity of an index's passage store: its path, size and modification time (rebuilds change it)."""
    path = Path(index.store.path).resolve()
    st = path.stat()
    return hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{len(index.store)}".encode()).hexdigest()[:16]


def answerable_ids(
    examples: Sequence[QAExample], index, dataset: str = "dataset", use_cache: bool = True, progress: bool = False
) -> set[str]:
    """Ids of the questions with a gold answer in some passage of `index`, cached per (dataset, index)."""
    stem = Path(dataset).stem if dataset not in DATASETS else dataset
    cache = cache_dir() / "answerable" / f"{stem}-{_examples_key(examples)}-{_store_key(index)}.json"
    if use_cache and cache.is_file():
        try:
            return set(json.loads(cache.read_text())["answerable_ids"])
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged cache entry is recomputed
    from tqdm.auto import tqdm

    finder = AnswerFinder(p.text for p in index.store)
    ids = [
        ex.id
        for ex in tqdm(examples, desc="answerable", disable=not progress, unit="q")
        if finder.contains(ex.answers, ex.regex)
    ]
    if use_cache:
        record = {"dataset": dataset, "index": str(index.directory), "total": len(examples), "answerable_ids": ids}
        with contextlib.suppress(OSError):  # a read-only cache costs time, not correctness
            atomic_write_text(cache, json.dumps(record))
    return set(ids)


def select_examples(
    settings: EvalSettings, index=None, progress: bool = False
) -> tuple[list[QAExample], dict]:
    """The questions a run evaluates (answerable filter first, then the limit) and what was kept."""
    examples = load_dataset(settings.dataset)
    info = {"dataset": settings.dataset, "total_questions": len(examples), "answerable_only": settings.answerable_only}
    if settings.answerable_only:
        if index is None:
            raise LatentRagError("--answerable-only needs an index to check the passages against")
        keep = answerable_ids(examples, index, settings.dataset, progress=progress)
        examples = [ex for ex in examples if ex.id in keep]
        info["answerable_questions"] = len(examples)
    if settings.limit is not None:
        examples = examples[: settings.limit]
    info["evaluated_questions"] = len(examples)
    info["labels"] = _has_labels(settings.dataset)
    if not examples:
        raise LatentRagError(f"no questions left to evaluate in {settings.dataset} (after filter and limit)")
    return examples, info


def _has_labels(dataset: str) -> bool:
    """A JSONL whose records give a one-token `label` (FEVER-style classification): report label accuracy."""
    path = Path(dataset)
    if dataset in DATASETS or path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                return isinstance(record, dict) and "label" in record
    return False


# ---- closed-book baseline ---------------------------------------------------------------------------
def closed_book_batch(generator, questions: list[str]):
    """Generator inputs with no passage (k=1), formatted by the generator itself
    (`Generator.prepare_closed_book`: the bare question for seq2seq; for a decoder-only LM the RAG prompt
    without its Title/Passage lines)."""
    return generator.prepare_closed_book(questions)


@torch.inference_mode()
def closed_book_generate(generator, questions: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The paper's parametric-only baseline: greedy decoding with the generator alone, no retrieval.

    With one "document" of prior 1, RAG-Token's marginal is the generator's own distribution, so the
    shared greedy decoder is reused (log p(z|x) = 0 for the single empty context).
    """
    from latentrag.generation.decoding import rag_token_greedy

    if not questions:
        return []
    batch = closed_book_batch(generator, questions)
    log_prior = torch.zeros(len(questions), 1, device=generator.device)
    decoded = rag_token_greedy(generator, batch, log_prior, max_new_tokens)
    return [generator.decode_tokens(d.token_ids) for d in decoded]


# ---- one run ----------------------------------------------------------------------------------------
def _predict(model, examples: list[QAExample], settings: EvalSettings) -> list[dict]:
    questions = [ex.question for ex in examples]
    if settings.closed_book:
        texts = closed_book_generate(model.generator, questions, settings.max_new_tokens)
        answers, retrieved = [None] * len(examples), [[] for _ in examples]
    else:
        # One retrieval per batch, deep enough for recall@k and for the answer (its first k passages).
        depth = min(max(max(settings.recall_ks), settings.k), len(model.retriever.index))
        with torch.inference_mode():
            batch = model.retrieve(questions, k=depth)
        answers = model.generate(questions, mode=settings.mode, decoding=settings.decoding,
                                 num_beams=settings.num_beams, k=settings.k,
                                 max_new_tokens=settings.max_new_tokens, retrieved=batch.top(settings.k))
        texts, retrieved = [a.text for a in answers], batch.passages
    records = []
    for ex, text, answer, ranked in zip(examples, texts, answers, retrieved, strict=True):
        passages = [] if answer is None else [
            {"id": p.id, "title": p.title, "text": p.text, "probability": prob,
             **({"evidence": answer.evidence[i]} if answer.evidence else {})}
            for i, (p, prob) in enumerate(zip(answer.passages, answer.doc_probs, strict=True))
        ]
        records.append(score_record({
            "id": ex.id,
            "question": ex.question,
            "gold": ex.answers,
            "regex": ex.regex,
            "prediction": text,
            "passages": passages,
            "retrieved": [
                {"id": p.id, "title": p.title, "has_answer": M.has_answer(p.text, ex.answers, ex.regex)}
                for p in ranked
            ],
        }))
    return records


@torch.inference_mode()
def retrieval_recall(
    model, examples: Sequence[QAExample], ks: Sequence[int] = RECALL_KS, batch_size: int = 64, progress: bool = False
) -> dict[str, float]:
    """Answer recall@k of the retriever alone (no generation: cheap), DPR `has_answer` on the top-k passages."""
    from tqdm.auto import tqdm

    depth = min(max(ks), len(model.retriever.index))
    texts, golds, flags = [], [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="recall@k", disable=not progress, unit="batch"):
        batch = examples[start : start + batch_size]
        passages = model.retrieve([ex.question for ex in batch], k=depth).passages
        texts += [[p.text for p in ps] for ps in passages]
        golds += [ex.answers for ex in batch]
        flags += [ex.regex for ex in batch]
    recall = M.answer_recall_at_k(texts, golds, [k for k in ks if k <= depth], regex=flags)
    return {str(k): v for k, v in recall.items()}


def score_record(record: dict) -> dict:
    """Per-question scores: `correct` (EM, or regex match for CuratedTrec), `f1`, `answer_contained`."""
    pred, golds, regex = record["prediction"], record["gold"], record.get("regex", False)
    record["correct"] = M.regex_match(pred, golds) if regex else M.exact_match(pred, golds)
    record["f1"] = None if regex else M.token_f1(pred, golds)
    record["answer_contained"] = float(M.has_answer(pred, golds, regex))
    return record


def read_predictions(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a predictions file. A torn last line (a crash mid-write) is dropped, and with `repair`
    cut from the file so appends continue cleanly; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        raise LatentRagError(f"predictions file {path} not found: check the path")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_bytes = [], 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the torn last line of an interrupted append
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise LatentRagError(f"{path}:{lineno}: malformed prediction record ({e.msg})") from e
        good_bytes += len(line) + 1
    return records


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluate(
    model,
    settings: EvalSettings,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    examples: list[QAExample] | None = None,
    info: dict | None = None,
) -> dict:
    """Run `model` over the data set; write predictions.jsonl, metrics.json and report.md in `out_dir`."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    settings = settings.resolved(getattr(model, "config", None))
    if examples is None:
        index = None if settings.closed_book and not settings.answerable_only else model.retriever.index
        examples, info = select_examples(settings, index, progress=progress)
    info = dict(info or {"dataset": settings.dataset, "evaluated_questions": len(examples)})
    predictions, run_file = out / PREDICTIONS, out / RUN
    run = {"settings": settings.key(), "label": settings.label, "data": info, **settings.extra}
    if predictions.exists():
        if not resume:
            raise LatentRagError(
                f"{predictions} already exists: pass --resume to continue that run, or choose another --out"
            )
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous.get("settings") != run["settings"]:
                raise LatentRagError(
                    f"{out} holds a run with other settings ({previous.get('label')}, "
                    f"{previous.get('settings')}); resume it with the same options or choose another --out"
                )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps(run, indent=2))
    done = {r["id"]: r for r in read_predictions(predictions, repair=True)} if predictions.exists() else {}
    wanted = {ex.id for ex in examples}
    todo = [ex for ex in examples if ex.id not in done]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=settings.label, unit="q",
               disable=not progress)
    # No dropout: predictions must not depend on how the run was batched or resumed. Each submodule's
    # own mode is restored afterwards (a wrapper may say "training" while its HF models are in eval).
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    if modes:
        model.eval()
    try:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            records = _predict(model, batch, settings)
            _append(predictions, records)
            done.update((r["id"], r) for r in records)
            bar.update(len(batch))
    finally:
        bar.close()
        for module, training in modes:
            module.training = training
    records = [done[ex.id] for ex in examples if ex.id in wanted]
    return finish(records, out, run)


def finish(records: list[dict], out: Path, run: dict) -> dict:
    """Score the records and write metrics.json and report.md atomically."""
    from latentrag.evaluation.report import write_run_report

    result = {**run, "metrics": score_records(records, run.get("settings", {}).get("recall_ks", RECALL_KS),
                                             labels=run.get("data", {}).get("labels", False))}
    result["data"] = {**run.get("data", {}), "evaluated_questions": len(records)}
    atomic_write_text(out / METRICS, json.dumps(result, indent=2))
    write_run_report(out, result)
    return result


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def reading_scores(records: list[dict]) -> dict:
    """Does the reader use what it reads? `reading_accuracy`: exact match on the questions whose gold answer is
    in a passage read; `attribution`: of the right answers that carry a per-passage p(z|x,y) (`Answer.evidence`),
    the share whose most probable passage holds the answer — evidence a user can check; `copied`: the share of
    (non-empty) answers that a passage read states word for word (title or text, DPR's token match) — answers
    from the index rather than from the weights —, and `wrong_read_copied` the same share among the wrong
    answers to questions whose answer was read (a reader that copies the wrong span, not one that ignores its
    evidence). None when no record applies (closed-book; concatenation and FiD have no evidence)."""
    read = [r for r in records if any(M.has_answer(p["text"], r["gold"], r.get("regex", False))
                                      for p in r.get("passages") or [])]

    def copied(r: dict) -> float:
        return float(any(M.has_answer(f"{p.get('title', '')} {p['text']}", [r["prediction"]]) for p in r["passages"]))

    answered = [r for r in records if r.get("passages") and M.dpr_tokens(r.get("prediction", ""))]
    answered_ids = {id(r) for r in answered}
    attributed = []
    for r in records:
        passages = r.get("passages") or []
        if r["correct"] and passages and all("evidence" in p for p in passages):
            top = max(passages, key=lambda p: p["evidence"])
            attributed.append(float(M.has_answer(top["text"], r["gold"], r.get("regex", False))))
    return {"answer_read": len(read) / len(records), "reading_accuracy": _mean([r["correct"] for r in read]),
            "attributed_answers": len(attributed), "attribution": _mean(attributed),
            "copied": _mean([copied(r) for r in answered]),
            "wrong_read_copied": _mean([copied(r) for r in read if not r["correct"] and id(r) in answered_ids])}


def score_records(records: list[dict], recall_ks: Sequence[int] = RECALL_KS, labels: bool = False) -> dict:
    """All metrics over prediction records (see the module docstring); None where a metric does not apply."""
    if not records:
        raise LatentRagError("no predictions to score")
    records = [score_record(dict(r)) for r in records]
    preds = [r["prediction"] for r in records]
    plain = [r for r in records if not r.get("regex", False)]
    out: dict = {
        "n": len(records),
        "exact_match": _mean([r["correct"] for r in records]),
        "regex_match": _mean([r["correct"] for r in records if r.get("regex", False)]),
        "f1": _mean([r["f1"] for r in plain]),
        "answer_contained": _mean([r["answer_contained"] for r in records]),
        "mean_prediction_words": _mean([len(p.split()) for p in preds]),
    }
    ranked = [r.get("retrieved") or [] for r in records]
    if all(ranked):
        depth = min(len(x) for x in ranked)
        first = [next((i for i, p in enumerate(x) if p["has_answer"]), None) for x in ranked]
        out["answer_recall"] = {
            str(k): sum(f is not None and f < k for f in first) / len(records) for k in sorted(recall_ks) if k <= depth
        }
    else:
        out["answer_recall"] = None
    out.update(reading_scores(records))
    if plain:
        plain_preds, refs = [r["prediction"] for r in plain], [r["gold"] for r in plain]
        out.update(M.bleu(plain_preds, refs))
        out["rouge_l"] = M.rouge_l(plain_preds, refs)
        out["q_bleu1"] = M.q_bleu1(plain_preds, refs)
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = M.distinct_n(preds, n)
    out["label_accuracy"] = M.label_accuracy(preds, [r["gold"][0] for r in records]) if labels else None
    return out


def rescore(predictions: str | Path, out_dir: str | Path | None = None) -> dict:
    """Re-score an existing predictions file (no generation); writes metrics.json and report.md."""
    predictions = Path(predictions)
    records = read_predictions(predictions)
    if not records:
        raise LatentRagError(f"{predictions} holds no predictions")
    seen: set = set()
    for lineno, record in enumerate(records, start=1):
        if record.get("id") in seen:
            raise LatentRagError(
                f"{predictions}: question id '{record.get('id')}' appears twice (record {lineno}): each question "
                "must be scored once; re-run the evaluation on data with unique ids"
            )
        seen.add(record.get("id"))
    out = Path(out_dir) if out_dir else predictions.parent
    run_file = predictions.parent / RUN
    run = json.loads(run_file.read_text()) if run_file.is_file() else {
        "label": predictions.stem, "settings": {"recall_ks": list(RECALL_KS)}, "data": {"dataset": str(predictions)}
    }
    out.mkdir(parents=True, exist_ok=True)
    return finish(records, out, run)


def default_run_dir(settings: EvalSettings) -> Path:
    """Where a run goes when no folder is given: `eval-runs/{dataset}-{mode|closed-book}` (settings resolved
    against the model first, see `EvalSettings.resolved`)."""
    return Path("eval-runs") / f"{Path(settings.dataset).stem}-{'closed-book' if settings.closed_book else settings.mode}"


def evaluate_sweep(
    model,
    runs: Sequence[EvalSettings],
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Several runs of one model (e.g. one per k): each in its own folder, plus a comparison report.

    One run writes into `out_dir` itself; several write into `out_dir/k{k}` and add `out_dir/report.md`
    (with the EM-against-k plot in `out_dir/figures`). out_dir defaults to `default_run_dir(runs[0])`.
    """
    from latentrag.evaluation.report import write_comparison_report

    runs = [settings.resolved(getattr(model, "config", None)) for settings in runs]  # None: the model's
    if not runs:
        raise LatentRagError("no runs to evaluate: give at least one EvalSettings")
    ks = [s.k for s in runs]
    if len(runs) > 1 and len(set(ks)) != len(ks):
        raise LatentRagError(f"the runs of a sweep need different k values (got {ks}): each k gets folder k{{k}}")
    base = Path(out_dir) if out_dir is not None else default_run_dir(runs[0])
    results = []
    for settings in runs:
        index = None if settings.closed_book and not settings.answerable_only else model.retriever.index
        examples, info = select_examples(settings, index, progress=progress)
        out = base if len(runs) == 1 else base / f"k{settings.k}"
        results.append(evaluate(model, settings, out, resume=resume, progress=progress, examples=examples,
                                info=info))
    if len(runs) > 1:
        write_comparison_report(base / "report.md", results, f"Evaluation on {runs[0].dataset} against k",
                                sweep=results, figures_dir=base / "figures")
    return results
