"""Do the answers follow the index? The paper's index hot-swap test (§4.5), as a counterfactual edit.

The paper answers questions about world leaders with a 2016 and a 2018 Wikipedia index and counts how
often the answer changes with the index (70 % / 68 %). Here the second index is made from the first:

1. keep the questions whose gold answer is in the k retrieved passages *and* that the model answers
   correctly with the original index (`select_questions`);
2. give each a substitute answer (`plan_swaps`), by one of two pairings:
   * `typed` (default, like the paper's leader-for-leader swap): the nearest answer of the same type in a
     pool of the split's other answers, embedded by the document tower with their questions (`evaluation.
     substitutes`: answers and questions both near, so a state for a state, not a state's capital);
   * `coarse` (harder): the gold answer of another kept question, paired with a seeded shuffle, preferring
     one of the same coarse form (number / name / phrase);
   every answer — substitute or replaced — is written as the index states it (`AnswerFinder.stated`: the first
   listed alias a passage holds, else the one most passages hold, as they write it), as the paper's leaders
   were named as Wikipedia names them;
   never one of its own gold aliases, never one already in the passages it retrieved, never one that must
   itself be rewritten out of a passage it would be written into; a question whose answer is in its own
   wording is dropped;
3. in every passage of the index holding a kept question's answer (DPR `has_answer`), replace each
   occurrence of every gold alias (case-insensitive, whole words) by the substitute, all questions in one
   pass so substitutes are never substituted again (`counterfactual_edits`), in the text and in the title
   (`title_edits`: a lead section titled "Neil Armstrong" must not state the answer its text no longer
   does; reports whose settings lack "titles" left them as they were); a question whose answer survives the rewrite
   (a form the pattern misses) is dropped;
4. re-encode only the edited passages (`retrieval.index.edit.replace_passages`), swap the copy in with
   `RagModel.swap_index` (no retraining), ask again, and count: the answer follows the swapped index
   (prediction = the substitute), stays the original answer, or is something else (`run_knowledge_swap`).
   Each answer's evidence — the passage of highest p(z|x,y) (`Answer.evidence`) — is recorded too: after
   the swap, is it a rewritten passage?

`match="em"` (the paper's protocol) compares SQuAD-normalised exact matches; `match="contained"`
compares DPR `has_answer` on the prediction, for models that answer in sentences (untrained generators).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import regex as regex_lib
import torch

from latentrag.errors import LatentRagError
from latentrag.evaluation import metrics as M
from latentrag.evaluation.datasets import QAExample
from latentrag.evaluation.substitutes import MAX_SIMILARITY, SubstitutePool, answer_kind

MATCHES = ("em", "contained")
PAIRINGS = ("typed", "coarse")
OUTCOMES = ("follows", "stays", "other")
_WORD = r"[\p{L}\p{N}\p{M}]"


@dataclass
class Swap:
    """One question of the test: its gold aliases, the substitute, and the passages (rows) rewritten for it."""

    id: str
    question: str
    golds: list[str]
    substitute: str = ""
    rows: list[int] = field(default_factory=list)
    dataset: str = ""
    original_prediction: str = ""
    stated: str = ""  # the gold answer as the index states it (`AnswerFinder.stated`): others' coarse substitute
    similarity: float | None = None  # typed pairing: the substitute's nearness to `stated` (`SubstitutePool.ranked`)
    evidence_has_answer: bool | None = None  # the original answer's top-p(z|x,y) passage holds a gold answer
    prior_on_answer: float | None = None  # p(z|x) over the k read from the true index, on passages holding a gold


def _check_match(match: str) -> None:
    if match not in MATCHES:
        raise LatentRagError(f"unknown match '{match}': choose one of {', '.join(MATCHES)}")


def answered(prediction: str, golds: Sequence[str], match: str) -> bool:
    """Is `prediction` one of `golds`: SQuAD exact match (`em`) or DPR containment (`contained`)?"""
    _check_match(match)
    return bool(M.exact_match(prediction, golds)) if match == "em" else M.has_answer(prediction, golds)


def outcome(prediction: str, golds: Sequence[str], substitute: str, match: str = "em") -> str:
    """'follows' (the substitute, not an original answer), 'stays' (an original answer, not the substitute)
    or 'other' (neither, or — under `contained` — both)."""
    new, old = answered(prediction, [substitute], match), answered(prediction, golds, match)
    return "follows" if new and not old else "stays" if old and not new else "other"


def alias_pattern(alias: str) -> str:
    """A regex for one answer string: case-insensitive at use, whitespace-flexible, whole words only."""
    parts = [regex_lib.escape(p) for p in alias.split()]
    if not parts:
        return ""
    body = r"\s+".join(parts)
    start = f"(?<!{_WORD})" if regex_lib.match(_WORD, alias.strip()[0]) else ""
    end = f"(?!{_WORD})" if regex_lib.match(_WORD, alias.strip()[-1]) else ""
    return start + body + end


def rewrite(text: str, replacements: Sequence[tuple[Sequence[str], str]]) -> str:
    """Replace every whole-word, case-insensitive occurrence of each alias by its substitute, in one pass
    (longest alias first), so an inserted substitute is never rewritten again."""
    aliases: list[tuple[str, str]] = []
    for golds, substitute in replacements:
        aliases += [(a, substitute) for a in golds if alias_pattern(a)]
    if not aliases:
        return text
    aliases.sort(key=lambda a: -len(a[0]))
    pattern = regex_lib.compile(
        "|".join(f"(?P<a{i}>{alias_pattern(a)})" for i, (a, _) in enumerate(aliases)),
        flags=regex_lib.IGNORECASE | regex_lib.UNICODE,
    )
    return pattern.sub(lambda m: aliases[int(m.lastgroup[1:])][1], text)


@torch.inference_mode()
def select_questions(
    model, examples: Sequence[QAExample], k: int, mode: str, match: str = "em", max_new_tokens: int = 24,
    batch_size: int = 4, dataset: str = "", progress: bool = False,
) -> tuple[list[Swap], dict]:
    """Step 1: the questions with a gold answer among the k retrieved passages that the model answers right."""
    from tqdm.auto import tqdm

    _check_match(match)
    counts = {"examined": 0, "regex_skipped": 0, "answer_retrieved": 0, "answered": 0}
    kept: list[Swap] = []
    plain = [ex for ex in examples if not ex.regex]
    counts["regex_skipped"] = len(examples) - len(plain)
    for start in tqdm(range(0, len(plain), batch_size), desc=f"select {dataset}", disable=not progress, unit="batch"):
        batch = plain[start : start + batch_size]
        counts["examined"] += len(batch)
        retrieved = model.retrieve([ex.question for ex in batch], k=k).passages
        hits = [ex for ex, ps in zip(batch, retrieved, strict=True)
                if any(M.has_answer(p.text, ex.answers) for p in ps)]
        counts["answer_retrieved"] += len(hits)
        if not hits:
            continue
        answers = model.generate([ex.question for ex in hits], mode=mode, k=k, max_new_tokens=max_new_tokens)
        for ex, answer in zip(hits, answers, strict=True):
            if answered(answer.text, ex.answers, match):
                counts["answered"] += 1
                top = answer.evidence_passage()
                kept.append(Swap(ex.id, ex.question, list(ex.answers), dataset=dataset,
                                 original_prediction=answer.text,
                                 evidence_has_answer=None if top is None else M.has_answer(top.text, ex.answers),
                                 prior_on_answer=prior_on(answer, ex.answers)))
    return kept, counts


def prior_on(answer, golds: Sequence[str]) -> float:
    """The p(z|x) mass an answer's k passages put on those holding one of `golds` (DPR `has_answer`)."""
    return float(sum(w for p, w in zip(answer.passages, answer.doc_probs, strict=True) if M.has_answer(p.text, golds)))


def _own_aliases(swap: Swap) -> set[str]:
    return {n for n in (M.normalize_answer(g) for g in swap.golds) if n}


def plan_swaps(
    selected: Sequence[Swap], finder, retrieved_rows: dict[str, list[int]], texts: Sequence[str], seed: int = 0,
    pool: SubstitutePool | None = None,
) -> tuple[list[Swap], list[dict]]:
    """Step 2: the passages holding each question's answer and a substitute for it; (kept, dropped with why).

    `finder` is an `AnswerFinder` over the index's passage texts `texts`; `retrieved_rows[id]` are the rows
    the model retrieved for that question with the original index. Questions sharing a gold alias with an
    earlier one are dropped (one passage cannot state two substitutes for the same words). With a `pool`
    the pairing is typed (the nearest same-type answer of the pool), else coarse (another kept question's
    answer, seeded shuffle).
    """
    kept, dropped, seen = [], [], {}
    for s in selected:
        aliases = _own_aliases(s)
        if not aliases:
            dropped.append({"id": s.id, "reason": "empty answer", "why": "no gold alias with any words"})
            continue
        if M.has_answer(s.question, s.golds):
            dropped.append({"id": s.id, "reason": "answer in the question", "why": "its answer is in the question"})
            continue
        clash = next((seen[a] for a in aliases if a in seen), None)
        if clash is not None:
            dropped.append({"id": s.id, "reason": "answer shared", "why": f"shares a gold answer with question {clash}"})
            continue
        rows = finder.passages_with(s.golds)
        if not rows:
            dropped.append({"id": s.id, "reason": "answer in no passage", "why": "no passage holds its answer"})
            continue
        seen.update((a, s.id) for a in aliases)
        kept.append(Swap(**{**asdict(s), "rows": rows, "stated": finder.stated(s.golds)}))
    if pool is not None:
        return _typed_pairs(kept, pool, retrieved_rows, texts, dropped)
    rng = random.Random(seed)
    pool = [(s.id, s.stated) for s in kept]
    rows_of = {s.id: set(s.rows) for s in kept}
    paired = []
    for s in kept:
        own = _own_aliases(s)
        read = [r for r in retrieved_rows.get(s.id, ()) if r in set(s.rows)]
        candidates = [(i, a) for i, a in pool if i != s.id and M.normalize_answer(a) not in own]
        rng.shuffle(candidates)
        kind = answer_kind(s.stated)
        best, best_score = None, None
        for other, a in candidates:
            if rows_of[other] & rows_of[s.id]:
                continue  # it would be written into a passage that must lose the other question's answer
            if _unfit(s, a, read, texts):
                continue
            score = (answer_kind(a) != kind, sum(M.has_answer(texts[r], [a]) for r in s.rows))
            if best_score is None or score < best_score:
                best, best_score = a, score
                if score == (False, 0):
                    break
        if best is None:
            dropped.append({"id": s.id, "reason": "no substitute", "why": "no substitute fits"})
            continue
        paired.append(Swap(**{**asdict(s), "substitute": best}))
    return paired, dropped


def _unfit(s: Swap, substitute: str, read: Sequence[int], texts: Sequence[str]) -> bool:
    """A substitute that holds a gold answer as words or is held by one, sits in the question, or is already
    stated in a passage the model read the answer from would test nothing."""
    return (M.has_answer(substitute, s.golds) or any(M.has_answer(g, [substitute]) for g in s.golds)
            or M.has_answer(s.question, [substitute]) or any(M.has_answer(texts[r], [substitute]) for r in read))


def _typed_pairs(kept: Sequence[Swap], pool: SubstitutePool, retrieved_rows: dict[str, list[int]],
                 texts: Sequence[str], dropped: list[dict]) -> tuple[list[Swap], list[dict]]:
    """Typed pairing: each question gets the nearest acceptable same-type answer of `pool` to the answer its
    passages state. A substitute that is another kept question's answer must not be written into a passage
    that has to lose it."""
    rows_of_alias: dict[str, set[int]] = {}
    for s in kept:
        for a in _own_aliases(s):
            rows_of_alias.setdefault(a, set()).update(s.rows)
    paired = []
    for s, ranked in zip(kept, pool.ranked([s.stated for s in kept], [s.question for s in kept]), strict=True):
        mine = set(s.rows)
        read = [r for r in retrieved_rows.get(s.id, ()) if r in mine]

        def accept(a: str, s=s, mine=mine, read=read) -> bool:
            return not (rows_of_alias.get(M.normalize_answer(a), set()) & mine) and not _unfit(s, a, read, texts)

        choice = SubstitutePool.choose(ranked, s.golds, accept)
        if choice is None:
            dropped.append({"id": s.id, "reason": "no substitute",
                            "why": "no same-type answer of the pool fits"})
            continue
        similarity = next(sim for a, sim in ranked if a == choice)
        paired.append(Swap(**{**asdict(s), "substitute": choice, "similarity": round(similarity, 4)}))
    return paired, dropped


def _by_row(swaps: Sequence[Swap]) -> dict[int, list[Swap]]:
    """The swaps whose answer each rewritten passage (row) holds."""
    by_row: dict[int, list[Swap]] = {}
    for s in swaps:
        for r in s.rows:
            by_row.setdefault(r, []).append(s)
    return by_row


def counterfactual_edits(swaps: Sequence[Swap], texts: Sequence[str]) -> tuple[dict[int, str], list[Swap], list[dict]]:
    """Step 3: {row: rewritten text} with every kept question's answer replaced by its substitute.

    A question whose answer still holds (DPR `has_answer`) in one of its rewritten passages — a form the
    whole-word pattern does not match — or whose substitute appears in none of them is dropped and the
    edits are recomputed without it.
    """
    swaps, dropped = list(swaps), []
    while True:
        edits = {r: rewrite(texts[r], [(s.golds, s.substitute) for s in group]) for r, group in _by_row(swaps).items()}
        bad = []
        for s in swaps:
            survives = sum(M.has_answer(edits[r], s.golds) for r in s.rows)
            stated = sum(M.has_answer(edits[r], [s.substitute]) for r in s.rows)
            if survives or not stated:
                bad.append(s)
                why = (f"its answer survives the rewrite in {survives} of {len(s.rows)} passages" if survives
                       else "the substitute appears in none of its passages")
                dropped.append({"id": s.id, "reason": "answer survives the rewrite", "why": why})
        if not bad:
            return {r: t for r, t in edits.items() if t != texts[r]}, swaps, dropped
        gone = {s.id for s in bad}
        swaps = [s for s in swaps if s.id not in gone]
        if not swaps:
            return {}, [], dropped


def title_edits(swaps: Sequence[Swap], titles: Mapping[int, str] | Sequence[str]) -> dict[int, str]:
    """{row: rewritten title} for the passages rewritten for `swaps` whose title names a replaced answer: a lead
    section titled "Neil Armstrong" whose text now names "Galileo" would otherwise state both (step 3)."""
    out = {r: rewrite(titles[r], [(s.golds, s.substitute) for s in group])
           for r, group in _by_row(swaps).items() if isinstance(titles, Sequence) or r in titles}
    return {r: t for r, t in out.items() if t != titles[r]}


def summarise(records: Sequence[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Rates of each outcome with 95 % percentile-bootstrap intervals (per-question 0/1 indicators)."""
    n = len(records)
    out: dict = {"n": n}
    for name in OUTCOMES:
        values = [float(r["outcome"] == name) for r in records]
        if n:
            low, high = M.bootstrap_interval(values, resamples=resamples, seed=seed)
            out[name] = {"rate": sum(values) / n, "count": int(sum(values)), "ci95": [low, high]}
        else:
            out[name] = {"rate": None, "count": 0, "ci95": None}
    reached = [r for r in records if r["swapped_retrieved_substitute"]]
    out["substitute_retrieved"] = len(reached) / n if n else None
    out["follows_when_substitute_retrieved"] = (
        sum(r["outcome"] == "follows" for r in reached) / len(reached) if reached else None
    )
    out["original_still_retrieved"] = sum(r["swapped_retrieved_original"] for r in records) / n if n else None
    # attribution: the top-p(z|x,y) passage of the answer before the swap holds the gold; after it, of the
    # answers that follow, the top passage is one that was rewritten (None where answers carry no evidence)
    before = [r["original_evidence_has_answer"] for r in records if r.get("original_evidence_has_answer") is not None]
    out["evidence_has_answer_before"] = sum(before) / len(before) if before else None
    after = [r["swapped_evidence_rewritten"] for r in records
             if r["outcome"] == "follows" and r.get("swapped_evidence_rewritten") is not None]
    out["evidence_rewritten_when_follows"] = sum(after) / len(after) if after else None
    # how much of p(z|x) the passages stating the answer get: the true index's, then the swapped one's
    for name, key in (("prior_on_answer_before", "original_prior_on_answer"),
                      ("prior_on_substitute_after", "swapped_prior_on_substitute")):
        values = [r[key] for r in records if r.get(key) is not None]
        out[name] = sum(values) / len(values) if values else None
    # does the reader follow whenever retrieval weighs the rewritten passages? follows, split at half the mass
    weighed = [r for r in records if r.get("swapped_prior_on_substitute") is not None]
    if weighed:
        out["follows_by_prior"] = {}
        for name, heavy in (("at_least_half", True), ("below_half", False)):
            group = [r for r in weighed if (r["swapped_prior_on_substitute"] >= 0.5) == heavy]
            out["follows_by_prior"][name] = {
                "n": len(group), "rate": sum(r["outcome"] == "follows" for r in group) / len(group) if group else None}
    return out


def select_all(model, examples_by_dataset: dict[str, Sequence[QAExample]], k: int | None = None,
               mode: str | None = None, match: str = "em", max_new_tokens: int = 24, batch_size: int = 4,
               progress: bool = False) -> tuple[list[Swap], dict]:
    """Step 1 over several data sets: (kept questions, counts by data set)."""
    k = model.config.k if k is None else k
    mode = mode or model.config.mode
    selected, selection = [], {}
    for dataset, examples in examples_by_dataset.items():
        kept, counts = select_questions(model, examples, k, mode, match, max_new_tokens, batch_size, dataset,
                                        progress)
        selected += kept
        selection[dataset] = counts
    return selected, selection


@torch.inference_mode()
def run_knowledge_swap(
    model,
    examples_by_dataset: dict[str, Sequence[QAExample]],
    work_dir: str | Path,
    *,
    k: int | None = None,
    mode: str | None = None,
    match: str = "em",
    max_new_tokens: int = 24,
    batch_size: int = 4,
    seed: int = 0,
    resamples: int = 2000,
    progress: bool = False,
    pairing: str = "typed",
    pool_answers: Sequence[str] | None = None,
    pool_examples: Sequence[QAExample] | None = None,
    max_similarity: float = MAX_SIMILARITY,
    selected: tuple[list[Swap], dict] | None = None,
) -> dict:
    """The whole test (steps 1–4) for a model with its original index loaded; the index is restored after.

    `pairing` 'typed' draws substitutes from `pool_answers` taken as they are, or else from the answers of
    `pool_examples` (default: every example given) as the index states them (`AnswerFinder.stated`: "Utah",
    not DPR's first alias "Utah (State)"; "Detroit, Michigan", not "Detroit , Michigan") and paired by answer
    and question; nearer than `max_similarity`: an alias, skipped. 'coarse' draws from the other tested
    questions' answers, stated the same way (see the module docstring). `selected`: step 1's
    result (`select_questions` per data set: the kept questions and the counts by data set), to test several
    pairings on one selection.

    The counterfactual index is written to `work_dir` (reused when the edits and source are unchanged).
    Returns the selection counts, dropped questions, outcome rates with 95 % intervals, and per-question
    records.
    """
    from latentrag.evaluation.evaluate import AnswerFinder
    from latentrag.retrieval.corpus import Passage
    from latentrag.retrieval.index.edit import replace_passages

    _check_match(match)
    if pairing not in PAIRINGS:
        raise LatentRagError(f"unknown pairing '{pairing}': choose one of {', '.join(PAIRINGS)}")
    k = model.config.k if k is None else k
    mode = mode or model.config.mode
    original = model.retriever.index
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if selected is None:
            selected = select_all(model, examples_by_dataset, k, mode, match, max_new_tokens, batch_size, progress)
        selected, selection = selected
        if len(selected) < 2:
            raise LatentRagError(
                f"only {len(selected)} question(s) have the answer retrieved and answered right ({selection}): the "
                "test needs at least two (one's answer is the other's substitute); examine more (--limit) or use "
                "--match contained for a model that answers in sentences"
            )
        texts = [p.text for p in original.store]
        finder = AnswerFinder(texts)
        retrieved_rows = {}
        for start in range(0, len(selected), 64):
            batch = selected[start : start + 64]
            ids = model.retrieve([s.question for s in batch], k=k).ids
            retrieved_rows.update((s.id, row.tolist()) for s, row in zip(batch, ids, strict=True))
        pool, given_pool = None, pool_answers is not None
        if pairing == "typed":
            if pool_answers is None:
                if pool_examples is None:
                    pool_examples = [ex for examples in examples_by_dataset.values() for ex in examples]
                stated = [(ex.question, finder.stated(ex.answers)) for ex in pool_examples
                          if ex.answers and not ex.regex]
                pool_questions = [q for q, a in stated if a]
                pool_answers = [a for _, a in stated if a]
            pool = SubstitutePool(pool_answers, model.document_encoder(), max_similarity, progress=progress,
                                  questions=None if given_pool else pool_questions)
        swaps, dropped = plan_swaps(selected, finder, retrieved_rows, texts, seed, pool=pool)
        edits, swaps, more = counterfactual_edits(swaps, texts)
        dropped += more
        if not swaps:
            raise LatentRagError(f"no question left after pairing and rewriting ({dropped}); examine more (--limit)")
        ids, store = original.store.ids(), original.store
        titles = title_edits(swaps, {r: store[r].title for r in edits})  # only the rows rewritten: no full scan
        passages = {ids[r]: Passage(ids[r], titles.get(r, store[r].title), t) for r, t in edits.items()}
        counterfactual = replace_passages(original, passages, Path(work_dir), model.document_encoder(),
                                          progress=progress)
        model.swap_index(counterfactual)
        rewritten = {ids[r] for r in edits}
        records = []
        for start in range(0, len(swaps), batch_size):
            batch = swaps[start : start + batch_size]
            answers = model.generate([s.question for s in batch], mode=mode, k=k, max_new_tokens=max_new_tokens)
            for s, a in zip(batch, answers, strict=True):
                top = a.evidence_passage()
                records.append({
                    "id": s.id, "dataset": s.dataset, "question": s.question, "gold": s.golds, "stated": s.stated,
                    "substitute": s.substitute, "original_prediction": s.original_prediction,
                    "swapped_prediction": a.text, "outcome": outcome(a.text, s.golds, s.substitute, match),
                    "edited_passages": len(s.rows),
                    "swapped_retrieved_substitute": any(M.has_answer(p.text, [s.substitute]) for p in a.passages),
                    "swapped_retrieved_original": any(M.has_answer(p.text, s.golds) for p in a.passages),
                    "kind": answer_kind(s.stated), "similarity": s.similarity,
                    "original_evidence_has_answer": s.evidence_has_answer,
                    "swapped_evidence_rewritten": None if top is None else top.id in rewritten,
                    "original_prior_on_answer": s.prior_on_answer,
                    "swapped_prior_on_substitute": prior_on(a, [s.substitute]),
                })
    finally:
        model.swap_index(original)
        for module, training in modes:
            module.training = training
    per_dataset = {d: summarise([r for r in records if r["dataset"] == d], resamples, seed)
                   for d in examples_by_dataset}
    return {
        "settings": {"k": k, "mode": mode, "match": match, "max_new_tokens": max_new_tokens, "seed": seed,
                     "pairing": pairing, "pool": None if pool is None else len(pool), "titles": "rewritten",
                     "substitutes": "as given" if given_pool and pool is not None else "as the index states them",
                     "nearness": None if pool is None else "answer cosine" if pool.question_vectors is None
                     else "mean of the answers' and the questions' cosines"},
        "selection": selection,
        "selected": len(selected),
        "dropped": dropped,
        "edited_passages": len(edits),
        "index_passages": len(original),
        "counterfactual_index": str(counterfactual.directory),
        "overall": summarise(records, resamples, seed),
        "per_dataset": per_dataset,
        "records": records,
    }
