"""Training data: (question, answer) pairs from the DPR dev splits or a JSONL file, a held-out validation
split, and a seeded example stream whose position is one integer (so a resumed run reads what an
uninterrupted one would).

No passage supervision: the answer is all the paper's training signal (§2.4). An example's target is a
gold answer the index states (`stated_targets`, the default) or, with `--target first`, its first listed
gold answer, as Hugging Face's RAG fine-tuning scripts do.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from latentrag.errors import LatentRagError
from latentrag.evaluation.datasets import DATASETS, QAExample, load_dataset


@dataclass
class TrainPair:
    id: str
    question: str
    answer: str  # the training target: the first gold answer, or the one the index states (`stated_targets`)
    answers: list[str]  # every gold answer, for validation's exact match and answer recall


def load_pairs(spec: str) -> list[TrainPair]:
    """'nq-dev,trivia-dev' (named DPR splits) or a path to a JSONL/TSV of questions and answers."""
    pairs: list[TrainPair] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.endswith("-test"):
            raise LatentRagError(f"'{part}' is a test split: train on dev splits (nq-dev, trivia-dev) or your own file")
        examples = load_dataset(part)
        if not examples:
            raise LatentRagError(f"{part} holds no questions to train on")
        stem = part if part in DATASETS else "file"
        pairs += [_pair(ex, stem) for ex in examples]
    if not pairs:
        raise LatentRagError(f"no training data in '{spec}': name nq-dev, trivia-dev or a .jsonl of questions and answers")
    seen: set[str] = set()
    for p in pairs:
        if p.id in seen:
            raise LatentRagError(f"question id '{p.id}' appears twice in the training data: ids must be unique")
        seen.add(p.id)
    return pairs


def _pair(example: QAExample, stem: str) -> TrainPair:
    if example.regex:
        raise LatentRagError(f"{stem}: regex answers (CuratedTrec) cannot be training targets")
    answers = [a for a in example.answers if a.strip()]
    if not answers:
        raise LatentRagError(f"{stem}: question '{example.id}' has no non-empty answer to train on")
    return TrainPair(f"{stem}:{example.id}", example.question, answers[0].strip(), answers)


def split_validation(pairs: list[TrainPair], fraction: float, seed: int) -> tuple[list[TrainPair], list[TrainPair]]:
    """A seeded held-out fraction of the training pairs (the rest trains)."""
    if not 0.0 < fraction < 1.0:
        raise LatentRagError(f"--val-fraction must lie strictly between 0 and 1, got {fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * fraction))
    if n_val >= len(pairs):
        raise LatentRagError(f"{len(pairs)} questions leave nothing to train on after holding out {fraction:.0%}")
    held = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


class ExampleStream:
    """An endless stream of training pairs: epoch e is a permutation seeded by (seed, e).

    Its state is the number of examples consumed, so resuming needs only that integer; a batch may run
    across an epoch boundary, so every batch is full and every step sees the same number of examples.
    """

    def __init__(self, pairs: Sequence[TrainPair], seed: int, position: int = 0):
        if not pairs:
            raise LatentRagError("no training pairs")
        self.pairs, self.seed, self.position = list(pairs), seed, position
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.pairs)))
            random.Random(f"{self.seed}/{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order

    @property
    def epoch(self) -> float:
        return self.position / len(self.pairs)

    def take(self, n: int) -> list[TrainPair]:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, len(self.pairs))
            out.append(self.pairs[self._order_of(epoch)[offset]])
            self.position += 1
        return out


def stated_targets(pairs: list[TrainPair], finder) -> list[TrainPair]:
    """Each pair with a target its knowledge source states (`AnswerFinder.stated`: the first gold answer when
    some passage holds it, else the one most passages hold, written as a passage writes it); unchanged when none
    is stated. A generator trained toward an alias no passage contains learns that the answer is not what the
    passages say. `finder`: an `evaluation.evaluate.AnswerFinder` over the passages."""
    out = []
    for pair in pairs:
        written = finder.stated(pair.answers)
        out.append(pair if written is None else replace(pair, answer=written))
    return out
