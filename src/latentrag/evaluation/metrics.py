"""Metrics the RAG paper reports, each defined as the reference implementation its numbers came from.

Open-domain QA: exact match and token F1 as SQuAD v1.1 define them, CuratedTrec regular expressions as
DrQA/DPR match them, and answer recall@k (a gold answer appears in one of the top k passages) with DPR's
token-level `has_answer`. Generation: BLEU through sacrebleu, ROUGE-L through rouge-score, Q-BLEU-1 of
Nema & Khapra (2018) for Jeopardy question generation, distinct-n for diversity. FEVER: label accuracy.

Scales follow the reference tools: BLEU is 0-100 (sacrebleu); every other score is 0-1.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import regex as regex_lib  # a transformers dependency; DPR uses it for \p{..} classes and CuratedTrec patterns

from latentrag.errors import LatentRagError

Golds = str | Sequence[str]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# DPR's SimpleTokenizer (from DrQA): runs of letters/digits/marks, or any single non-space character.
_DPR_TOKEN = regex_lib.compile(
    r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]",
    flags=regex_lib.IGNORECASE | regex_lib.UNICODE | regex_lib.MULTILINE,
)
_REGEX_FLAGS = regex_lib.IGNORECASE | regex_lib.UNICODE | regex_lib.MULTILINE


def _golds(golds: Golds) -> list[str]:
    """One gold string or several; no golds is a data error, not a zero score."""
    out = [golds] if isinstance(golds, str) else list(golds)
    if not out:
        raise LatentRagError("no gold answers given: every question needs at least one reference answer")
    return out


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation (lower, drop punctuation, drop a/an/the, squeeze spaces), so EM/F1 match it."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Golds) -> float:
    """SQuAD exact match: 1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(g)) for g in _golds(golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Golds) -> float:
    """SQuAD v1.1 bag-of-tokens F1 after normalisation, max over gold answers (both empty scores 0, as in v1.1)."""
    return max(_f1(prediction, g) for g in _golds(golds))


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> regex_lib.Pattern | None:
    try:
        return regex_lib.compile(unicodedata.normalize("NFD", pattern), flags=_REGEX_FLAGS)
    except Exception:  # DPR/DrQA: a pattern that does not compile matches nothing
        return None


def regex_match(prediction: str, patterns: Golds) -> float:
    """CuratedTrec EM: 1.0 if the prediction matches any gold regex from its start (DrQA's `regex_match_score`).

    Flags IGNORECASE|UNICODE|MULTILINE as in DrQA/DPR; both sides NFD-normalised as DPR does; a pattern that
    does not compile counts as no match.
    """
    text = unicodedata.normalize("NFD", prediction)
    for pattern in _golds(patterns):
        compiled = _compile(pattern)
        if compiled is not None and compiled.match(text) is not None:
            return 1.0
    return 0.0


def dpr_tokens(text: str) -> list[str]:
    """DPR's SimpleTokenizer words, uncased, on NFD text: what `has_answer` compares token by token."""
    return list(_tokens(text))


@functools.lru_cache(maxsize=1 << 16)
def _tokens(text: str) -> tuple[str, ...]:
    """Cached: recall@k re-reads the same passages (and answers) across questions and ranks."""
    return tuple(t.lower() for t in _DPR_TOKEN.findall(unicodedata.normalize("NFD", text)))


def _contains(tokens: tuple[str, ...], answer: tuple[str, ...]) -> bool:
    n, first = len(answer), answer[0]
    return any(tokens[i : i + n] == answer for i, t in enumerate(tokens) if t == first)


def has_answer(text: str, golds: Golds, regex: bool = False) -> bool:
    """Whether a passage contains a gold answer, exactly as DPR decides it for retrieval accuracy.

    Strings: the answer's token sequence occurs in the passage's (DPR SimpleTokenizer, uncased, NFD), so
    "Paris" is found in "Paris, France" but "Par" is not. `regex=True` (CuratedTrec): the pattern is
    searched anywhere in the NFD passage (DPR's `regex_match`). An answer with no tokens never matches.
    """
    if regex:
        passage = unicodedata.normalize("NFD", text)
        return any((c := _compile(p)) is not None and c.search(passage) is not None for p in _golds(golds))
    tokens = _tokens(text)
    return any(_contains(tokens, answer) for answer in map(_tokens, _golds(golds)) if answer)


def form_in_texts(answer: str, texts: Sequence[str]) -> str:
    """The answer as the texts that state it most often write it ("Henry james" → "Henry James", DPR's tokenised
    "Detroit , Michigan" → "Detroit, Michigan"), matched as a whole word sequence up to case and the spaces
    around punctuation; unchanged when some text writes it exactly so, or none states it."""
    words = answer.split()
    body = "".join((r"\s*" if i and not (w[0].isalnum() and words[i - 1][-1].isalnum()) else r"\s+" if i else "")
                   + re.escape(w) for i, w in enumerate(words))
    pattern = re.compile(r"(?<!\w)" + body + r"(?!\w)", re.IGNORECASE)
    forms = Counter(m.group(0) for text in texts for m in pattern.finditer(text))
    return answer if answer in forms or not forms else forms.most_common(1)[0][0]


def answer_recall_at_k(
    passage_texts_per_question: Sequence[Sequence[str]],
    golds_per_question: Sequence[Golds],
    ks: Iterable[int] = (1, 5, 10, 20),
    regex: bool | Sequence[bool] = False,
) -> dict[int, float]:
    """DPR's top-k retrieval accuracy: the fraction of questions with a gold answer in their first k passages.

    Passages are in rank order. `regex` may be one flag or one per question (CuratedTrec mixed with others).
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise LatentRagError(f"ks must be positive integers, got {ks}")
    n = len(passage_texts_per_question)
    if n != len(golds_per_question):
        raise LatentRagError(
            f"{n} passage lists but {len(golds_per_question)} gold-answer lists: give one of each per question"
        )
    if n == 0:
        raise LatentRagError("no questions given: recall@k needs at least one question")
    flags = [regex] * n if isinstance(regex, bool) else list(regex)
    if len(flags) != n:
        raise LatentRagError(
            f"{len(flags)} regex flags for {n} questions: give one flag, or one per question"
        )
    first_hits = []
    for passages, golds, is_regex in zip(passage_texts_per_question, golds_per_question, flags, strict=True):
        hit = next((i for i, p in enumerate(passages[: ks[-1]]) if has_answer(p, golds, is_regex)), None)
        first_hits.append(math.inf if hit is None else hit)
    return {k: sum(h < k for h in first_hits) / n for k in ks}


def _check_pairs(predictions: Sequence, references: Sequence, what: str) -> None:
    if len(predictions) != len(references):
        raise LatentRagError(
            f"{len(predictions)} predictions but {len(references)} {what}: give one per prediction"
        )
    if not predictions:
        raise LatentRagError("no predictions given: a corpus score needs at least one example")


def _reference_lists(references_lists: Sequence[Golds]) -> list[list[str]]:
    return [_golds(refs) for refs in references_lists]


def bleu(
    predictions: Sequence[str], references_lists: Sequence[Golds], max_order: int = 4
) -> dict[str, float]:
    """Corpus BLEU-1..BLEU-`max_order` (0-100) from sacrebleu, the standard reproducible BLEU.

    BLEU-n is `sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score`: the brevity-penalised geometric mean
    of the 1..n-gram precisions, with sacrebleu's defaults (13a tokenisation, case-sensitive, exp
    smoothing). Each prediction may have several references. Returns {"bleu1": .., ..., "bleu{max_order}": ..}.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references_lists, "reference lists")
    if max_order < 1:
        raise LatentRagError(f"max_order must be at least 1, got {max_order}")
    refs = _reference_lists(references_lists)
    width = max(map(len, refs))
    # sacrebleu wants one stream per reference slot; None pads predictions with fewer references.
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return {
        f"bleu{n}": BLEU(max_ngram_order=n).corpus_score(list(predictions), streams).score
        for n in range(1, max_order + 1)
    }


def rouge_l(predictions: Sequence[str], references_lists: Sequence[Golds]) -> float:
    """ROUGE-L F-measure (0-1) from rouge-score, max over each prediction's references, mean over examples."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(predictions, references_lists, "reference lists")
    scorer = RougeScorer(["rougeL"])
    scores = [
        max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
        for pred, refs in zip(predictions, _reference_lists(references_lists), strict=True)
    ]
    return sum(scores) / len(scores)


# ---- Q-BLEU (Nema & Khapra, EMNLP 2018), following the authors' PrekshaNema25/Answerability-Metric ----

# Function words exactly as the authors' script lists them (a subset of NLTK's English stop words).
_QB_STOP_WORDS_TEXT = (
    "did have ourselves hers between yourself but again there about once during out very having with they "
    "own an be some for do its yours such into of most itself other off is s am or as from him each the "
    "themselves until below are we these your his through don nor me were her more himself this down "
    "should our their while above both up to ours had she all no at any before them same and been in will "
    "on does yourselves then that because over so can not now under he you herself has just too only "
    "myself those i after few t being if theirs my against a by doing it further was here than"
)
_QB_STOP_WORDS = frozenset(_QB_STOP_WORDS_TEXT.split())
_QB_QUESTION_WORDS = frozenset({"what", "which", "why", "who", "whom", "whose", "where", "when", "how"})
_QB_QUESTION_WORDS_CASED = _QB_QUESTION_WORDS | {w.capitalize() for w in _QB_QUESTION_WORDS}
# coco-caption's PTBTokenizer drops these tokens after tokenising; brackets become -LRB- etc. and go too.
_QB_PUNCT = frozenset(
    {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "{", "}", "[", "]"}
)
_QB_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.,]\w+)*|\.\.\.|--|\S")


def _qb_tokens(text: str) -> list[str]:
    """Approximates coco-caption's PTBTokenizer (-lowerCase, punctuation removed) without Java/CoreNLP."""
    return [t for t in _QB_TOKEN.findall(text.lower()) if t not in _QB_PUNCT]


def _qb_question_type(words: list[str]) -> list[str]:
    """Question words, plus the word after "what"/"which", which names the answer type."""
    out = []
    for i, w in enumerate(words):
        if w in _QB_QUESTION_WORDS_CASED:
            out.append(w)
            if w.lower() in ("what", "which") and i + 1 < len(words):
                out.append(words[i + 1])
    return out


def _qb_components(sentence: str) -> dict[str, list[str]]:
    """Split a question into the four parts Answerability weighs, as the authors' script does."""
    words = sentence.split()
    qt = _qb_question_type(words)
    rest = [w for w in words if w not in qt]
    ner_words = words[1:] if words and words[0].lower() in _QB_QUESTION_WORDS else words
    return {
        "qt": _qb_tokens(" ".join(qt)),
        "re": _qb_tokens(" ".join(w for w in rest if not w[0].isupper() and w not in _QB_STOP_WORDS)),
        "ner": _qb_tokens(" ".join(w for w in ner_words if w[0].isupper())),
        "sw": _qb_tokens(" ".join(w.lower() for w in words if w.lower() in _QB_STOP_WORDS)),
    }


def _coco_sentence_bleu(test: list[str], ref: list[str], n: int) -> float:
    """coco-caption's per-sentence BLEU-n, tiny/small smoothing included (so two empty sides score 0)."""
    tiny, small = 1e-15, 1e-9
    score = 1.0
    for k in range(1, n + 1):
        test_ngrams = Counter(tuple(test[i : i + k]) for i in range(len(test) - k + 1))
        ref_ngrams = Counter(tuple(ref[i : i + k]) for i in range(len(ref) - k + 1))
        correct = sum((test_ngrams & ref_ngrams).values())
        score *= (correct + tiny) / (max(0, len(test) - k + 1) + small)
    score **= 1.0 / n
    ratio = (len(test) + tiny) / (len(ref) + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _bleu1_f(hyp: list[str], ref: list[str]) -> float:
    precision, recall = _coco_sentence_bleu(hyp, ref, 1), _coco_sentence_bleu(ref, hyp, 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def q_bleu(
    predictions: Sequence[str],
    references: Sequence[Golds],
    order: int = 1,
    *,
    ner_weight: float = 0.6,
    qt_weight: float = 0.2,
    re_weight: float = 0.1,
    delta: float = 0.7,
) -> float:
    """Q-BLEU-`order` (0-1): BLEU corrected for whether a generated question is still answerable.

    Q-BLEU = delta * Answerability + (1 - delta) * BLEU-n, per question, averaged. Answerability weighs the
    BLEU-1 F-score (harmonic mean of BLEU-1 both ways) of four parts of the question: named entities
    (`ner_weight`), question type (`qt_weight`: question words plus the word after what/which), relevant
    content words (`re_weight`) and function words (1 - the other three). Defaults are the authors'
    (README of PrekshaNema25/Answerability-Metric): 0.6 / 0.2 / 0.1 / 0.1 and delta 0.7.

    Follows the authors' script, including its heuristics: named entities are capitalised words (a leading
    question word excluded; no NER model), a part absent from both sides scores 0, and BLEU is
    coco-caption's per-sentence BLEU. Stanford's PTB tokeniser is approximated by a regex. With several
    references, the best-scoring one counts.
    """
    _check_pairs(predictions, references, "references")
    sw_weight = 1 - ner_weight - qt_weight - re_weight
    weights = (ner_weight, qt_weight, re_weight, sw_weight, delta)
    if order < 1 or any(not -1e-9 <= w <= 1 + 1e-9 for w in weights):
        raise LatentRagError(
            f"order must be >= 1 and delta and the weights in [0, 1], the weights summing to at most 1; "
            f"got order={order}, ner/qt/re/function-word weights and delta {weights}"
        )
    sw_weight = max(0.0, sw_weight)

    def one(pred: str, ref: str) -> float:
        p, r = _qb_components(pred), _qb_components(ref)
        answerability = (
            ner_weight * _bleu1_f(p["ner"], r["ner"])
            + qt_weight * _bleu1_f(p["qt"], r["qt"])
            + re_weight * _bleu1_f(p["re"], r["re"])
            + sw_weight * _bleu1_f(p["sw"], r["sw"])
        )
        fluency = _coco_sentence_bleu(_qb_tokens(pred), _qb_tokens(ref), order)
        return delta * answerability + (1 - delta) * fluency

    scores = [
        max(one(pred, ref) for ref in refs)
        for pred, refs in zip(predictions, _reference_lists(references), strict=True)
    ]
    return sum(scores) / len(scores)


def q_bleu1(predictions: Sequence[str], references: Sequence[Golds]) -> float:
    """Q-BLEU-1 with the authors' default weights: the metric the RAG paper reports for Jeopardy generation."""
    return q_bleu(predictions, references, order=1)


def distinct_n(texts: Iterable[str], n: int = 3) -> float:
    """Distinct n-grams / total n-grams over all outputs (the paper's generation-diversity figure, n=3).

    Lowercased whitespace tokens; n-grams do not cross outputs; no n-grams at all gives 0.0.
    """
    if n < 1:
        raise LatentRagError(f"n must be at least 1, got {n}")
    grams = []
    for text in texts:
        tokens = text.lower().split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def label_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Accuracy for one-token class targets (FEVER's SUPPORTS/REFUTES), compared after SQuAD normalisation."""
    _check_pairs(predictions, labels, "labels")
    hits = sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(predictions, labels, strict=True))
    return hits / len(labels)


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question scores (scipy's method="percentile").

    Each resample draws len(values) questions with replacement; the interval is the (α/2, 1−α/2)
    quantiles of the resampled means. Seeded, so a report's intervals are reproducible; resamples are
    drawn in blocks so memory stays small for thousands of questions.
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if data.size == 0:
        raise LatentRagError("no values to bootstrap: an interval needs at least one per-question score")
    if not 0 < confidence < 1:
        raise LatentRagError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1:
        raise LatentRagError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    block = max(1, (1 << 22) // data.size)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        means[start:stop] = data[rng.integers(0, data.size, size=(stop - start, data.size))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
