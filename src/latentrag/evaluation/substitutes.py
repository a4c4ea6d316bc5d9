"""Same-type substitute answers: a country for a country, a year for a year, a person for a person.

Both the knowledge-swap test (paper §4.5 swapped one world leader for another) and counterfactual training
(Longpre et al. 2021, "Entity-Based Knowledge Conflicts in Question Answering") rewrite an answer in the
passages to *another answer of the same kind*. A substitute of another kind ("Lungs" for a sport) makes the
rewritten passage nonsense, and a reader that declines to copy nonsense is not ignoring its evidence.

Here the kind is read off an encoder's space: a gold answer's substitutes are the other answers of a pool
(other questions' answers) nearest to it, of the same coarse form (`answer_kind`: number / name / phrase),
and not too near — a cosine above `max_similarity` is most often another name of the same thing
("USA" / "United States"), which would test nothing. An answer's nearest answers are often of a related kind,
not the same one (Colorado → Denver, Venezuela → Caracas); when the pool knows each answer's question, the
nearness is that of the answers and of the questions averaged: "Which US state is the Centennial State?" is
nearest to other questions asking for a state, as the paper's leader questions all asked for a leader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from latentrag.evaluation import metrics as M

MAX_SIMILARITY = 0.9  # nearer than this: most likely an alias of the gold answer, not another answer
CANDIDATES = 32  # nearest pool answers kept per query (the first acceptable one is used)


def answer_kind(answer: str) -> str:
    """Coarse form: 'number' (has a digit), 'name' (every word capitalised), 'phrase'."""
    if any(ch.isdigit() for ch in answer):
        return "number"
    words = [w for w in answer.split() if w[:1].isalpha()]
    return "name" if words and all(w[0].isupper() for w in words) else "phrase"


# particles shared by unrelated names ("Ludwig van Beethoven" / "Vincent van Gogh"): no evidence of an alias
PARTICLES = frozenset({"of", "and", "in", "on", "at", "to", "for", "by", "de", "del", "della", "der", "den", "des",
                       "di", "du", "da", "van", "von", "la", "le", "el", "al", "st", "saint"})


def _words(answer: str, kind: str) -> set[str]:
    words = set(M.normalize_answer(answer).split())
    if kind == "number":
        return {w for w in words if any(ch.isdigit() for ch in w)}
    return (words - PARTICLES) or words


def _stem_shared(a: set[str], b: set[str], length: int = 4) -> bool:
    """Two words of a and b begin alike ("ford" / "fordian", "chlorophyll" / "chlorofluorocarbons")."""
    return any(len(x) >= length and len(y) >= length and x[:length] == y[:length] for x in a for y in b)


def is_alias_of(candidate: str, golds: Sequence[str]) -> bool:
    """The candidate is too close to a gold answer to replace it: equal after SQuAD normalisation, or they
    share a word other than a particle ("Nolan North" / "David Nolan"; for numbers, a number: "June 4, 2018" /
    "June 22, 2018"), or a word's first four letters ("John Ford" / "Fordian")."""
    kind = answer_kind(candidate)
    mine = _words(candidate, kind)
    return not mine or any(mine & _words(g, kind) or M.normalize_answer(g) == M.normalize_answer(candidate)
                           or (kind != "number" and _stem_shared(mine, _words(g, kind))) for g in golds)


def as_written(answer: str) -> str:
    """An answer as running text would write it: trivia data sets shout some ("FOOTBALL", "BRUNEI"); a word in
    capitals longer than an acronym becomes title case, so that a rewritten passage still reads as prose."""
    return " ".join(w.title() if w.isupper() and len(w) > 4 else w for w in answer.split())


class SubstitutePool:
    """Answers to draw substitutes from, embedded once by `encoder` (a `DenseEncoder`; unit vectors).

    `ranked(answers, questions=None)` gives, for each query answer, the pool answers nearest to it (same
    `answer_kind`, answer cosine ≤ max_similarity), nearest first — by the answers' cosine, or, when both the
    pool and the query know their questions, by the mean of the answers' and the questions' cosines; `choose`
    applies the caller's own conditions on top. `questions[i]` is the question `answers[i]` answers.
    """

    def __init__(self, answers: Iterable[str], encoder, max_similarity: float = MAX_SIMILARITY,
                 candidates: int = CANDIDATES, batch_size: int = 256, progress: bool = False,
                 questions: Iterable[str] | None = None):
        answers = list(answers)
        asked = list(questions) if questions is not None else None
        if asked is not None and len(asked) != len(answers):
            raise ValueError(f"{len(asked)} questions for {len(answers)} answers: one question per answer")
        seen, unique, kept_questions = set(), [], []
        for i, a in enumerate(answers):
            key = M.normalize_answer(a)
            if key and key not in seen:
                seen.add(key)
                unique.append(as_written(a.strip()))
                kept_questions.append(asked[i] if asked is not None else "")
        self.answers = unique
        self.kinds = [answer_kind(a) for a in unique]
        self.encoder, self.max_similarity, self.candidates = encoder, max_similarity, candidates
        self.batch_size = batch_size
        self.vectors = self._encode(unique, progress)
        self.question_vectors = self._encode(kept_questions, progress) if asked is not None else None

    def _encode(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        return torch.nn.functional.normalize(
            self.encoder.encode(list(texts), batch_size=self.batch_size, progress=progress).float(), dim=-1)

    def __len__(self) -> int:
        return len(self.answers)

    @torch.inference_mode()
    def ranked(self, queries: Sequence[str], questions: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
        """For each query answer (asked by `questions[i]`, if given): (pool answer, similarity) of the same kind,
        nearest first, at most `candidates`."""
        if not queries:
            return []
        q = self._encode(queries)
        by_question = questions is not None and self.question_vectors is not None
        asked = self._encode(questions) if by_question else None
        out = []
        for start in range(0, len(queries), 1024):
            sims = q[start : start + 1024] @ self.vectors.T  # (b, N)
            alias = sims > self.max_similarity
            if by_question:
                sims = (sims + asked[start : start + 1024] @ self.question_vectors.T) / 2
            sims = sims.masked_fill(alias, -2.0)
            top = torch.topk(sims, min(len(self.answers), 4 * self.candidates), dim=-1)
            for row, query in enumerate(queries[start : start + 1024]):
                kind = answer_kind(query)
                picked = [(self.answers[i], float(s)) for s, i in zip(top.values[row].tolist(), top.indices[row].tolist(),
                                                                      strict=True)
                          if s > -2.0 and self.kinds[i] == kind]
                out.append(picked[: self.candidates])
        return out

    @staticmethod
    def choose(ranked: Sequence[tuple[str, float]], golds: Sequence[str],
               accept: Callable[[str], bool] | None = None) -> str | None:
        """The nearest ranked answer that is no alias of the golds and that `accept` takes; None if none is."""
        for candidate, _ in ranked:
            if is_alias_of(candidate, golds):
                continue
            if accept is None or accept(candidate):
                return candidate
        return None
