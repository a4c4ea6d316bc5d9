"""Every numerical example, exercise and the hands-on project of the course seed (seed 002), recomputed
through latentrag's own retrieval-probability and marginal functions.

A number printed in the seed is a claim: each quantity shows what the mathematics gives (`computed`) and,
where the seed prints one, the seed's figure (`seed`) and whether they agree to the seed's printed
precision (`agrees`). Where they differ, both are shown — the test suite asserts the computed value.
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch

from latentrag.marginals import (
    rag_sequence_log_likelihood,
    rag_token_log_likelihood,
    rag_token_log_marginal,
    retrieval_log_prior,
    sequence_log_likelihood,
)

Q = dict  # one reported quantity


def _q(computed: float | list, seed: str | list[str] | None = None) -> Q:
    """A computed value, and the seed's printed figure if any; agreement to the seed's printed precision."""
    out: Q = {"computed": computed}
    if seed is not None:
        seeds = seed if isinstance(seed, list) else [seed]
        values = computed if isinstance(computed, list) else [computed]
        out["seed"] = [float(s) for s in seeds] if isinstance(seed, list) else float(seed)
        out["agrees"] = all(
            abs(v - float(s)) <= 0.5 * 10 ** Decimal(s).as_tuple().exponent + 1e-12
            for v, s in zip(values, seeds, strict=True)
        )
    return out


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _token_logprobs(per_doc_probs) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator probabilities of the target tokens, p_θ(y_i|x,z,y_<i), as (1,k,T) log-probs and a mask."""
    lp = _t(per_doc_probs).log().unsqueeze(0)
    return lp, torch.ones(1, lp.shape[-1], dtype=torch.float64)


def _marginals(prior: list[float], per_doc_probs) -> tuple[float, float, list[float]]:
    """(RAG-Sequence p(y|x), RAG-Token p(y|x), RAG-Token per-token marginals) through the library."""
    log_prior = _t(prior).log().unsqueeze(0)
    lp, mask = _token_logprobs(per_doc_probs)
    seq = rag_sequence_log_likelihood(log_prior, lp, mask).exp().item()
    tok = rag_token_log_likelihood(log_prior, lp, mask).exp().item()
    per_token = rag_token_log_marginal(log_prior, lp)[0].exp().tolist()
    return seq, tok, per_token


def _retrieval(query, docs, k: int) -> tuple[list[float], list[int], list[float]]:
    """Scores d(z)ᵀq(x) over the corpus, the top-k ids, and p_η(z|x) as the softmax over the top-k (eq. 1)."""
    scores = _t(docs) @ _t(query)
    top = torch.topk(scores, k)
    prior = retrieval_log_prior(top.values.unsqueeze(0))[0].exp()
    return scores.tolist(), top.indices.tolist(), prior.tolist()


def lesson1() -> dict:
    return {
        "description": "Lesson 1: RAG (626M trainable parameters) vs T5-11B on Natural Questions.",
        "parameter_ratio": _q(11e9 / 626e6, "18"),
        "exact_match_gain_points": _q(44.5 - 34.5, "10"),
    }


def lesson2_worked() -> dict:
    q, docs = [0.3, 0.8, 0.1], [[0.4, 0.7, 0.2], [0.3, 0.5, 0.6], [0.1, 0.2, 0.8]]
    scores, _, p_all = _retrieval(q, docs, 3)
    _, top2, p_top2 = _retrieval(q, docs, 2)
    exps = [math.exp(s) for s in scores]
    return {
        "description": "Lesson 2 worked example: q(x)=[0.3,0.8,0.1], three documents, K=2.",
        "dot_products": _q(scores),
        "exp_scores": _q(exps, ["2.014", "1.733", "1.310"]),
        "exp_sum": _q(sum(exps), "5.057"),
        "p_eta_over_all_three": _q(p_all),
        "top_2_documents": _q([i + 1 for i in top2]),
        "p_eta_renormalised_over_top_2": _q(p_top2),
    }


def lesson2_exercise() -> dict:
    scores, top, prior = _retrieval([0.5, 0.3, 0.9], [[0.4, 0.1, 0.8], [0.9, 0.5, 0.1]], 2)
    return {
        "description": "Lesson 2 exercise: q=[0.5,0.3,0.9], d1=[0.4,0.1,0.8], d2=[0.9,0.5,0.1].",
        "dot_products": _q(scores),
        "p_eta": _q([prior[top.index(0)], prior[top.index(1)]]),
        "retrieved_document": _q(top[0] + 1),
    }


def lesson3() -> dict:
    worked, _ = _token_logprobs([[0.72, 0.15]])
    exercise, _ = _token_logprobs([[0.72, 0.45, 0.20]])
    ones2, ones3 = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    return {
        "description": "Lesson 3: p_θ(y|x,z) = Π_i p_θ(y_i|x,z,y_<i).",
        "worked_p_paris": _q(sequence_log_likelihood(worked, ones2).exp().item(), "0.108"),
        "exercise_p_paris_is": _q(sequence_log_likelihood(exercise, ones3).exp().item()),
    }


def lesson4_worked() -> dict:
    seq, tok, per_token = _marginals([0.6, 0.4], [[0.80, 0.90], [0.50, 0.70]])
    return {
        "description": "Lesson 4 worked example: p(z|x)=(0.6,0.4), y=(Paris,<end>).",
        "rag_sequence": _q(seq, "0.572"),
        "rag_token_per_token": _q(per_token, ["0.68", "0.82"]),
        "rag_token": _q(tok, "0.558"),
    }


def lesson4_exercise() -> dict:
    seq, tok, per_token = _marginals([0.6, 0.4], [[0.70, 0.60, 0.85], [0.40, 0.30, 0.90]])
    same_seq, same_tok, _ = _marginals([0.6, 0.4], [[0.70, 0.60, 0.85], [0.70, 0.60, 0.85]])
    return {
        "description": "Lesson 4 exercises: y=(Paris,France,<end>); and documents with identical generators.",
        "rag_sequence": _q(seq),
        "rag_token_per_token": _q(per_token),
        "rag_token": _q(tok),
        "extend_identical_generators": {
            "rag_sequence": _q(same_seq),
            "rag_token": _q(same_tok),
            "equal": same_seq == same_tok or abs(same_seq - same_tok) < 1e-15,
            "proof": "If p_θ(y_i|x,z,y_<i)=a_i for every z, RAG-Sequence gives Σ_z p(z|x) Π_i a_i = Π_i a_i and "
            "RAG-Token gives Π_i Σ_z p(z|x) a_i = Π_i a_i, since Σ_z p(z|x) = 1.",
        },
    }


def lesson5() -> dict:
    _, tok, _ = _marginals([0.6, 0.4], [[0.80, 0.90], [0.50, 0.70]])
    losses = [-math.log(0.72), -math.log(0.35)]
    return {
        "description": "Lesson 5: L = Σ_j −log p(y_j|x_j).",
        "worked_loss": _q(-math.log(tok), "0.584"),
        "exercise_losses": _q(losses),
        "exercise_total_loss": _q(sum(losses)),
        "exercise_larger_contribution": "example 2 (p=0.35): the larger loss gets the larger gradient",
    }


# Lesson 6's retrieval step is blank in the seed; p_η(z1|x)=0.65 is the value that reproduces all four of
# its printed per-token marginals (e.g. (0.798 − 0.70)/(0.85 − 0.70) = 0.653).
MONA_LISA_PRIOR = [0.65, 0.35]
MONA_LISA_GENERATOR = [[0.85, 0.92, 0.95, 0.80], [0.70, 0.88, 0.91, 0.75]]


def lesson6() -> dict:
    seq, tok, per_token = _marginals(MONA_LISA_PRIOR, MONA_LISA_GENERATOR)
    return {
        "description": "Lesson 6: 'Who painted the Mona Lisa?', K=2, y=(Leonardo,da,Vinci,<end>). "
        "The seed's retrieval probabilities are missing; p(z|x)=(0.65,0.35) is inferred from its marginals.",
        "inferred_p_eta": _q(MONA_LISA_PRIOR),
        "rag_token_per_token": _q(per_token, ["0.798", "0.906", "0.936", "0.783"]),
        "rag_token": _q(tok, "0.530"),
        "rag_token_note": "the seed multiplies its rounded per-token marginals; the exact product is 0.5292",
        "exercise_rag_sequence": _q(seq),
    }


# The hands-on project (numpy starter code) re-expressed with the library's functions.
PROJECT_DOCS = [[0.9, 0.3, 0.1, 0.2], [0.1, 0.8, 0.2, 0.3], [0.2, 0.1, 0.9, 0.1], [0.7, 0.2, 0.0, 0.5], [0.8, 0.1, 0.1, 0.4]]
PROJECT_QUERY = [0.8, 0.2, 0.1, 0.3]
PROJECT_TABLE = {  # doc -> token position -> p(token) for the target "paris <end>" (vocab ids 0 and 9)
    0: [0.75, 0.85],
    3: [0.45, 0.75],
    4: [0.60, 0.80],
}


def hands_on_project() -> dict:
    scores, top, prior = _retrieval(PROJECT_QUERY, PROJECT_DOCS, 3)
    generator = [PROJECT_TABLE[d] for d in top]
    seq, tok, _ = _marginals(prior, generator)
    seed_prior = [0.4191, 0.3379, 0.2430]
    seed_prior_seq, seed_prior_tok, _ = _marginals(seed_prior, generator)
    # p_η(z|x)·p_θ(y_i|x,z,y_<i) per token position, documents in retrieval order (the seed's layout)
    contributions = [[p * gen[i] for p, gen in zip(prior, generator, strict=True)] for i in range(2)]
    return {
        "description": "Hands-on project: 5 documents, K=3, target 'paris <end>'.",
        "dot_products": _q(scores),
        "top_3_documents": _q(top, ["0", "4", "3"]),
        "p_eta": _q(prior, ["0.4191", "0.3379", "0.2430"]),
        "rag_sequence": _q(seq, "0.521498"),
        "rag_token": _q(tok, "0.523498"),
        "token0_contributions": _q(contributions[0], ["0.3143", "0.2027", "0.1094"]),
        "token1_contributions": _q(contributions[1], ["0.3562", "0.2703", "0.1823"]),
        "loss_rag_sequence": _q(-math.log(seq), "0.651522"),
        "seed_consistency": {
            "note": "even with the seed's own p_eta the marginals are not the seed's: its expected output "
            "is not what its code computes",
            "rag_sequence_with_seed_p_eta": _q(seed_prior_seq),
            "rag_token_with_seed_p_eta": _q(seed_prior_tok),
        },
    }


def worked_examples() -> dict:
    return {
        "lesson1": lesson1(),
        "lesson2_worked_example": lesson2_worked(),
        "lesson2_exercise": lesson2_exercise(),
        "lesson3": lesson3(),
        "lesson4_worked_example": lesson4_worked(),
        "lesson4_exercises": lesson4_exercise(),
        "lesson5": lesson5(),
        "lesson6": lesson6(),
        "hands_on_project": hands_on_project(),
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def render_text(results: dict, indent: str = "") -> str:
    lines = []
    for name, item in results.items():
        if isinstance(item, dict) and "computed" in item:
            line = f"{indent}{name}: {_fmt(item['computed'])}"
            if "seed" in item:
                line += f"   (seed: {_fmt(item['seed'])}{'' if item['agrees'] else '  <- differs'})"
            lines.append(line)
        elif isinstance(item, dict):
            lines.append(f"{indent}{name}:")
            lines.append(render_text(item, indent + "  "))
        else:
            lines.append(f"{indent}{name}: {item}")
    return "\n".join(lines)
