"""Teaching the generator to read its passages, not to answer from memory.

RAG's training signal for the generator is −log p(y|x) over the k passages read; when none of them holds
the answer (most training questions, with a small index), the only way to lower the loss is to answer from
the weights, and the model learns to. Two options change what a step trains on (both off by default, so a
run without them is the paper's recipe):

* **Reading filter** (`reading_filter`): a question counts in a step only when a gold answer (DPR
  `has_answer`) is in the k passages the *current* query tower retrieves for it — decided at every step,
  since the tower trains. The step draws questions from the stream until its batch is full; the share
  kept is logged.
* **Counterfactual augmentation** (`counterfactual`, a share): for that share of the questions whose answer
  is read, every gold alias in the k passages (titles too) is rewritten to a same-type substitute (another
  training question's answer: `evaluation.substitutes`) and the target becomes the substitute — Longpre
  et al. (2021)'s remedy for knowledge conflicts. The retrieval scores stay those of the original passages,
  unless `rescore` (`--rescore-counterfactuals`): the rewritten passages are then re-encoded by the frozen
  document tower and scored by the current query tower (`reencode`), as an index holding them would score
  them — the knowledge swap's condition, where a rewrite loses retrieval weight (an entity's name weighs
  heavily in the document vector) and the marginal, through the query tower, may learn to give it back
  (measured with the shipped recipe: it flattened p(z|x) instead, and the swap did not move; docs/training.md).
* **Gold within reach** (`gold_within`, a depth N > k): a question whose k passages do not hold its answer
  reads instead its best-ranked passage that does, if one is among the first N, in place of its k-th — the
  positive passage of DPR's reader training, here scored by the current tower, so that p(z|x) is renormalised
  over what is read and the marginal pulls that passage up. Questions whose answer the tower ranks only
  lower down then carry a reading signal too; the read set is no longer the top k, a departure from the
  paper's training that is off by default.

With `--target stated` (the default) a question whose answer is read trains toward the gold answer as the
passages read state it (`read_target`), not toward an alias they do not contain.

All are deterministic functions of (seed, stream position, weights), so a resumed run selects exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from latentrag.errors import LatentRagError
from latentrag.evaluation import metrics as M
from latentrag.evaluation.knowledge_swap import rewrite
from latentrag.training.data import ExampleStream, TrainPair

Rewrite = tuple[list[str], str]  # (gold aliases to replace, substitute)


@dataclass
class ReadingBatch:
    """The questions a step trains on, their targets, and the passages' rewrites (None: as retrieved)."""

    pairs: list[TrainPair]
    targets: list[str]
    rewrites: list[Rewrite | None]
    drawn: int  # questions taken from the stream to fill the batch
    stats: dict = field(default_factory=dict)
    golds: list | None = None  # with gold_within: each question's answers, for the objective's `reach_gold`


def answer_read(passages, answers: Sequence[str]) -> bool:
    return any(M.has_answer(p.text, answers) for p in passages)


def read_target(pair: TrainPair, passages) -> str:
    """The target as the passages read state it: the pair's own when they hold it, else the first gold answer
    that the best-ranked passage holding one states, as that passage writes it."""
    if answer_read(passages, [pair.answer]):
        return pair.answer
    for passage in passages:
        for answer in pair.answers:
            if M.has_answer(passage.text, [answer]):
                return M.form_in_texts(answer.strip(), [passage.text])
    return pair.answer


def reach_gold(retrieved, k: int, golds: Sequence[Sequence[str] | None]):
    """k passages per question from a retrieval N deep: the top k, but a question none of whose k passages
    holds a gold answer reads its best-ranked passage that does (if any) in place of its k-th."""
    rows = []
    for passages, answers in zip(retrieved.passages, golds, strict=True):
        ranks = list(range(k))
        if answers and not answer_read(passages[:k], answers):
            deeper = next((i for i in range(k, len(passages)) if M.has_answer(passages[i].text, answers)), None)
            if deeper is not None:
                ranks[-1] = deeper
        rows.append(ranks)
    return retrieved.pick(rows)


def rewrite_passages(passages, change: Rewrite):
    """The passages with every gold alias (text and title) replaced by the substitute."""
    return [replace(p, title=rewrite(p.title, [change]), text=rewrite(p.text, [change])) for p in passages]


def reencode(model, retrieved, passages):
    """`retrieved` reading `passages` instead (same shape): those that differ from what was retrieved (title or
    text) re-encoded by the model's frozen document tower in fp32, as the index was built, and every score
    recomputed against the batch's query vectors, so gradients reach the query tower through the new ones."""
    from latentrag.retrieval.index.build import encode_passages

    changed = [(j, i) for j, (old, new) in enumerate(zip(retrieved.passages, passages, strict=True))
               for i, (a, b) in enumerate(zip(old, new, strict=True)) if (a.title, a.text) != (b.title, b.text)]
    vectors = retrieved.doc_vectors
    if changed:
        tower = model.document_encoder()
        with torch.autocast(tower.device.type, enabled=False):
            fresh = encode_passages(tower, [passages[j][i].title for j, i in changed],
                                    [passages[j][i].text for j, i in changed])
        vectors = vectors.clone()
        rows, cols = zip(*changed, strict=True)
        vectors[list(rows), list(cols)] = torch.from_numpy(fresh).to(vectors)
    return model.retriever.rescore(retrieved, passages, vectors)


class ReadingSelector:
    """Fills each step's batch (see the module docstring). `substitutes[id]` are a pair's ranked same-type
    candidates (`SubstitutePool.ranked`), needed only when `counterfactual` > 0."""

    def __init__(self, model, k: int, reading_filter: bool = False, counterfactual: float = 0.0,
                 substitutes: dict[str, list[tuple[str, float]]] | None = None, seed: int = 0,
                 gold_within: int | None = None, read_targets: bool = False):
        if not 0.0 <= counterfactual <= 1.0:
            raise LatentRagError(f"--counterfactual is a share between 0 and 1, got {counterfactual}")
        if counterfactual and substitutes is None:
            raise LatentRagError("counterfactual augmentation needs substitutes for the training answers")
        if gold_within is not None and gold_within <= k:
            raise LatentRagError(f"--gold-within is a depth beyond the k = {k} passages read, got {gold_within}")
        self.model, self.k, self.filter, self.share = model, k, reading_filter, counterfactual
        self.substitutes, self.seed, self.depth = substitutes or {}, seed, gold_within
        self.read_targets = read_targets

    @property
    def active(self) -> bool:
        return self.filter or self.share > 0 or self.depth is not None

    @torch.no_grad()
    def _passages(self, pairs: list[TrainPair]) -> tuple[list, list[bool]]:
        """The passages each question reads, and whether one came from beyond the top k (gold_within)."""
        if self.depth is None:
            return self.model.retrieve([p.question for p in pairs], self.k).passages, [False] * len(pairs)
        deep = self.model.retrieve([p.question for p in pairs], self.depth)
        read = reach_gold(deep, self.k, [p.answers for p in pairs]).passages
        return read, [r[-1].id != d[self.k - 1].id for r, d in zip(read, deep.passages, strict=True)]

    def _counterfactual(self, pair: TrainPair, passages, position: int) -> Rewrite | None:
        if not self.share or random.Random(f"{self.seed}/counterfactual/{position}").random() >= self.share:
            return None
        from latentrag.evaluation.substitutes import SubstitutePool

        def fits(candidate: str) -> bool:  # not already in what is read, nor in the question
            return not M.has_answer(pair.question, [candidate]) and not answer_read(passages, [candidate])

        substitute = SubstitutePool.choose(self.substitutes.get(pair.id, ()), pair.answers, fits)
        if substitute is None:
            return None
        change = (list(pair.answers), substitute)
        if answer_read(rewrite_passages(passages, change), pair.answers):
            return None  # a form of the answer the whole-word rewrite misses: the passages would contradict
        return change

    def take(self, stream: ExampleStream, n: int) -> ReadingBatch:
        """The next n questions to train on (all the stream gives when neither option is on)."""
        if not self.active:
            pairs = stream.take(n)
            return ReadingBatch(pairs, [p.answer for p in pairs], [None] * n, n)
        kept: list[TrainPair] = []
        rewrites: list[Rewrite | None] = []
        stated: list[str] = []
        drawn, limit, reached = 0, len(stream.pairs), 0
        while len(kept) < n:
            if drawn >= limit and not kept:
                raise LatentRagError(
                    f"no question among {drawn} drawn has a gold answer in the {self.k} passages read: the reading "
                    "filter leaves nothing to train on (raise --k, or drop --reading-filter)")
            start = stream.position
            candidates = stream.take(n - len(kept))
            drawn += len(candidates)
            passages_read, deeper = self._passages(candidates)
            for offset, (pair, passages, beyond) in enumerate(zip(candidates, passages_read, deeper, strict=True)):
                read = answer_read(passages, pair.answers)
                if self.filter and not read:
                    continue
                kept.append(pair)
                reached += beyond
                rewrites.append(self._counterfactual(pair, passages, start + offset) if read else None)
                stated.append(read_target(pair, passages) if read and self.read_targets else pair.answer)
        targets = [t if r is None else r[1] for t, r in zip(stated, rewrites, strict=True)]
        stats = {"kept": len(kept) / drawn, "counterfactual": sum(r is not None for r in rewrites), "reached": reached}
        golds = None if self.depth is None else [list(p.answers) for p in kept]
        return ReadingBatch(kept, targets, rewrites, drawn, stats, golds)


def build_substitutes(pairs: Sequence[TrainPair], encoder, progress: bool = False) -> dict[str, list]:
    """Ranked same-type substitutes for each training pair, drawn from the training answers alone."""
    from latentrag.evaluation.substitutes import SubstitutePool

    pool = SubstitutePool([p.answer for p in pairs], encoder, progress=progress)
    ranked = pool.ranked([p.answer for p in pairs])
    return {p.id: r for p, r in zip(pairs, ranked, strict=True)}
