"""Validation during training: does the reader answer, does the retriever find, is retrieval collapsing?

Per held-out question: greedy exact match (RAG-Token, concatenation and FiD greedy, RAG-Sequence fast with
one beam, or the generator alone when closed-book), −log p(y|x), answer recall@1/@k/@5 of the retrieved
passages (DPR's `has_answer`), exact match on the questions whose answer is in the k read ("reading accuracy"),
the entropy of p(z|x) over the top k, and which passage ranks first. Retrieval has
*collapsed* when one passage comes first for most questions whatever they ask (Hugging Face users saw it
fine-tuning RAG on FEVER): the share of distinct top-1 passages falls and the warning says so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from latentrag.evaluation import metrics as M
from latentrag.training.data import TrainPair

RECALL_AT = 5
COLLAPSE_SHARE = 0.5  # one passage first for at least half of the questions
COLLAPSE_DROP = 0.5  # or the share of distinct top-1 passages halved since the first validation


@torch.no_grad()
def validate(model, pairs: Sequence[TrainPair], mode: str, k: int, batch_size: int = 8, max_new_tokens: int = 16,
             closed_book: bool = False) -> dict:
    """Metrics over `pairs` with the model in eval mode (each submodule's mode restored afterwards)."""
    from latentrag.evaluation.evaluate import closed_book_generate

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct, losses, recall, recall_k, recall_1, entropies, top1 = [], [], [], [], [], [], []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = list(pairs[start : start + batch_size])
            questions, answers = [p.question for p in batch], [p.answer for p in batch]
            if closed_book:
                texts = closed_book_generate(model.generator, questions, max_new_tokens)
                losses += closed_book_loss(model, questions, answers).tolist()
            else:
                depth = min(max(k, RECALL_AT), len(model.retriever.index))
                retrieved = model.retrieve(questions, depth)
                top = retrieved.top(k)
                losses += model(questions, answers, mode=mode, retrieved=top).tolist()
                decoding = "fast" if mode == "sequence" else "greedy"
                generated = model.generate(questions, mode=mode, decoding=decoding, num_beams=1,
                                           max_new_tokens=max_new_tokens, retrieved=top)
                texts = [a.text for a in generated]
                for p, passages in zip(batch, retrieved.passages, strict=True):
                    hits = [M.has_answer(z.text, p.answers) for z in passages]
                    recall.append(any(hits[:RECALL_AT]))
                    recall_k.append(any(hits[:k]))
                    recall_1.append(hits[0])
                prior = top.log_prior.float()
                entropies += (-(prior.exp() * prior).sum(-1)).tolist()
                top1 += [int(ids[0]) for ids in top.ids]
            correct += [M.exact_match(t, p.answers) for t, p in zip(texts, batch, strict=True)]
    finally:
        for module, training in modes:
            module.training = training
    n = len(pairs)
    if n == 0:  # nothing to validate on (e.g. no held-out question is answerable): no averages
        return {"n": 0}
    out = {"n": n, "exact_match": 100 * sum(correct) / n, "loss": sum(losses) / n}
    if top1:
        counts = Counter(top1)
        out.update({
            f"recall@{RECALL_AT}": 100 * sum(recall) / n,
            f"recall@{k}": 100 * sum(recall_k) / n,
            "recall@1": 100 * sum(recall_1) / n,
            # exact match where the answer is in the k passages read: how well the generator reads
            "reading_exact_match": (100 * sum(c for c, r in zip(correct, recall_k, strict=True) if r) / sum(recall_k)
                                    if any(recall_k) else None),
            "prior_entropy": sum(entropies) / n,
            "prior_entropy_max": math.log(k),
            "distinct_top1": len(counts) / n,
            "most_common_top1": counts.most_common(1)[0][1] / n,
        })
    return out


def closed_book_loss(model, questions: list[str], answers: list[str], mode: str = "token") -> torch.Tensor:
    """−log p_θ(y|x) of the generator alone (one empty "passage" of prior 1): the parametric-only baseline."""
    from latentrag.rag_types import rag_type

    generator = model.generator
    batch = generator.prepare_closed_book(questions, answers)
    vocab_logprobs = generator.vocab_logprobs(batch)
    log_prior = torch.zeros(len(questions), 1, device=vocab_logprobs.device)
    return rag_type(mode).loss(log_prior, vocab_logprobs, batch.targets, batch.target_mask.float(), 0.0)


def collapse_warning(history: list[dict]) -> str | None:
    """A message when the latest validation shows retrieval collapsing onto the same passages, else None."""
    if not history or "distinct_top1" not in history[-1] or history[-1]["n"] < 10:
        return None
    last, first = history[-1], history[0]
    if last["most_common_top1"] >= COLLAPSE_SHARE:
        return (f"retrieval may be collapsing: one passage ranks first for {last['most_common_top1']:.0%} of the "
                "validation questions")
    if last["distinct_top1"] < COLLAPSE_DROP * first["distinct_top1"]:
        return (f"retrieval may be collapsing: distinct top-1 passages fell from {first['distinct_top1']:.0%} to "
                f"{last['distinct_top1']:.0%} of the validation questions")
    return None
