"""The paper's equations checked against values computed by hand from the mathematics."""

import math

import pytest
import torch

from latentrag import marginals as m


def lp(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_retrieval_prior_is_softmax_of_inner_products():
    # Lesson 2 worked example: q·d = 0.70, 0.55, 0.27
    scores = torch.tensor([[0.70, 0.55, 0.27]], dtype=torch.float64)
    z = math.exp(0.70) + math.exp(0.55) + math.exp(0.27)
    expected = [math.exp(0.70) / z, math.exp(0.55) / z, math.exp(0.27) / z]
    assert m.retrieval_log_prior(scores).exp()[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_rag_sequence_and_token_two_documents_by_hand():
    # p(z|x) = (0.6, 0.4); generator probs per doc for y = (Paris, <end>)
    prior, tok, mask = lp([[0.6, 0.4]]), lp([[[0.8, 0.9], [0.5, 0.7]]]), torch.ones(1, 2, dtype=torch.float64)
    seq_by_hand = 0.6 * 0.8 * 0.9 + 0.4 * 0.5 * 0.7
    token_by_hand = (0.6 * 0.8 + 0.4 * 0.5) * (0.6 * 0.9 + 0.4 * 0.7)
    assert m.rag_sequence_log_likelihood(prior, tok, mask).exp().item() == pytest.approx(seq_by_hand, rel=1e-12)
    assert m.rag_token_log_likelihood(prior, tok, mask).exp().item() == pytest.approx(token_by_hand, rel=1e-12)
    assert seq_by_hand == pytest.approx(0.572) and token_by_hand == pytest.approx(0.5576)


def test_three_token_exercise_by_hand():
    prior = lp([[0.6, 0.4]])
    tok = lp([[[0.70, 0.60, 0.85], [0.40, 0.30, 0.90]]])
    mask = torch.ones(1, 3, dtype=torch.float64)
    seq = 0.6 * 0.70 * 0.60 * 0.85 + 0.4 * 0.40 * 0.30 * 0.90  # 0.2574
    token = (0.6 * 0.7 + 0.4 * 0.4) * (0.6 * 0.6 + 0.4 * 0.3) * (0.6 * 0.85 + 0.4 * 0.9)  # 0.242208
    assert m.rag_sequence_log_likelihood(prior, tok, mask).exp().item() == pytest.approx(seq, rel=1e-12)
    assert m.rag_token_log_likelihood(prior, tok, mask).exp().item() == pytest.approx(token, rel=1e-12)


def test_padding_positions_contribute_nothing():
    prior = lp([[0.6, 0.4], [0.5, 0.5]])
    tok = lp([[[0.8, 0.9, 0.3], [0.5, 0.7, 0.2]], [[0.5, 0.1, 0.1], [0.25, 0.1, 0.1]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    seq = m.rag_sequence_log_likelihood(prior, tok, mask).exp()
    assert seq.tolist() == pytest.approx([0.572, 0.5 * 0.5 + 0.5 * 0.25], rel=1e-12)


def test_one_token_targets_make_sequence_and_token_identical():
    torch.manual_seed(0)
    prior = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    tok = torch.log_softmax(torch.randn(4, 6, 1, 10, dtype=torch.float64), -1)[..., 3]
    mask = torch.ones(4, 1, dtype=torch.float64)
    assert torch.allclose(m.rag_sequence_log_likelihood(prior, tok, mask), m.rag_token_log_likelihood(prior, tok, mask))


def test_long_answers_do_not_underflow():
    # 400 tokens of probability 0.01 under 50 documents: p(y|x) = 1e-800, below float64's range.
    prior = torch.log_softmax(torch.zeros(1, 50, dtype=torch.float64), -1)
    tok = torch.full((1, 50, 400), math.log(0.01), dtype=torch.float64)
    mask = torch.ones(1, 400, dtype=torch.float64)
    assert m.rag_sequence_log_likelihood(prior, tok, mask).item() == pytest.approx(400 * math.log(0.01))
    assert m.rag_token_log_likelihood(prior, tok, mask).item() == pytest.approx(400 * math.log(0.01))


def test_losses_match_likelihoods_without_smoothing_and_gather_targets():
    torch.manual_seed(1)
    prior = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    vocab = torch.log_softmax(torch.randn(2, 3, 4, 7, dtype=torch.float64), -1)
    targets = torch.tensor([[1, 2, 3, 0], [6, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    token_lp = m.gather_targets(vocab, targets)
    assert token_lp[1, 2, 1].item() == vocab[1, 2, 1, 5].item()
    assert torch.allclose(m.rag_sequence_loss(prior, vocab, targets, mask), -m.rag_sequence_log_likelihood(prior, token_lp, mask))
    assert torch.allclose(m.rag_token_loss(prior, vocab, targets, mask), -m.rag_token_log_likelihood(prior, token_lp, mask))


def test_label_smoothing_rag_token_by_hand():
    # One question, two documents, one position, vocabulary of 2: p1 = (0.9, 0.1), p2 = (0.3, 0.7).
    prior, eps = lp([[0.6, 0.4]]), 0.1
    vocab = lp([[[[0.9, 0.1]], [[0.3, 0.7]]]])
    marginal = [0.6 * 0.9 + 0.4 * 0.3, 0.6 * 0.1 + 0.4 * 0.7]  # (0.66, 0.34)
    expected = (1 - eps) * -math.log(marginal[0]) + (eps / 2) * -(math.log(marginal[0]) + math.log(marginal[1]))
    got = m.rag_token_loss(prior, vocab, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.float64), eps)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_label_smoothing_rag_sequence_by_hand():
    prior, eps = lp([[0.6, 0.4]]), 0.1
    vocab = lp([[[[0.9, 0.1]], [[0.3, 0.7]]]])
    nll = -math.log(0.6 * 0.9 + 0.4 * 0.3)
    # smoothing term: logsumexp_z [ V log p(z|x) + Σ_v log p_θ(v|x,z) ] with V = 2
    smooth = math.log(0.6**2 * 0.9 * 0.1 + 0.4**2 * 0.3 * 0.7)
    expected = (1 - eps) * nll - (eps / 2) * smooth
    got = m.rag_sequence_loss(prior, vocab, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.float64), eps)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_posteriors_by_bayes_rule():
    prior, tok = lp([[0.6, 0.4]]), lp([[[0.8, 0.9], [0.5, 0.7]]])
    mask = torch.ones(1, 2, dtype=torch.float64)
    seq_post = m.sequence_posterior(prior, m.sequence_log_likelihood(tok, mask))[0].tolist()
    joint = [0.6 * 0.72, 0.4 * 0.35]
    assert seq_post == pytest.approx([j / sum(joint) for j in joint], rel=1e-12)
    tok_post = m.token_posterior(prior, tok)[0]  # (T,k)
    assert tok_post.shape == (2, 2)
    assert tok_post[0].tolist() == pytest.approx([0.48 / 0.68, 0.20 / 0.68], rel=1e-12)
    assert tok_post[1].tolist() == pytest.approx([0.54 / 0.82, 0.28 / 0.82], rel=1e-12)


def test_gradient_flows_to_retrieval_scores():
    scores = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    tok = lp([[[0.9], [0.1]]])
    loss = -m.rag_sequence_log_likelihood(m.retrieval_log_prior(scores), tok, torch.ones(1, 1, dtype=torch.float64))
    loss.backward()
    # d(−log Σ softmax(s)_z a_z)/ds_1 = p(z1|x) − p(z1|x,y) < 0: raising the helpful document's score lowers the loss
    p1 = math.exp(1) / (math.exp(1) + 1)
    post1 = p1 * 0.9 / (p1 * 0.9 + (1 - p1) * 0.1)
    assert scores.grad[0, 0].item() == pytest.approx(p1 - post1, rel=1e-10)


def test_minus_infinity_at_a_padded_position_is_not_nan():
    # the case: [-1, -inf] with mask [1, 0] summed to NaN (0 · −inf) before padding used masked_fill
    tok = torch.tensor([[[-1.0, float("-inf")]]], dtype=torch.float64)
    for mask in (torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[True, False]])):
        assert m.sequence_log_likelihood(tok, mask).item() == -1.0
        assert m.rag_token_log_likelihood(torch.zeros(1, 1, dtype=torch.float64), tok, mask).item() == -1.0


@pytest.mark.parametrize("loss", [m.rag_sequence_loss, m.rag_token_loss])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_losses_and_gradients_finite_with_minus_infinity_at_padded_positions(loss, epsilon):
    torch.manual_seed(2)
    scores = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 3, 4, 7, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3, 0], [6, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    clean = torch.log_softmax(logits, -1)
    # padded positions hold −inf in every vocabulary entry under every document (the worst case)
    poisoned = clean.masked_fill((mask == 0)[:, None, :, None], float("-inf")).requires_grad_(True)
    got = loss(m.retrieval_log_prior(scores), poisoned, targets, mask, epsilon)
    assert torch.isfinite(got).all()
    # the padded positions contribute nothing: same value as with finite junk there
    assert torch.allclose(got, loss(m.retrieval_log_prior(scores), clean, targets, mask, epsilon))
    got.sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[(mask == 0)[:, None, :, None].expand_as(poisoned)] == 0).all()


def test_rag_sequence_smoothing_acts_as_a_hard_max_over_documents():
    # V = 2000 entries each carrying log p(z|x): a prior gap of 0.1 is 200 nats, so the smoothing term equals
    # the top-prior document's term alone, and its gradient raises that document's log-prior (weight ε).
    eps, vocab_size = 0.1, 2000
    scores = torch.tensor([[0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    vocab = torch.log_softmax(torch.zeros(1, 2, 1, vocab_size, dtype=torch.float64), -1)
    prior = m.retrieval_log_prior(scores)
    smooth_top = vocab_size * prior[0, 0] + vocab[0, 0].sum()
    got = m.rag_sequence_loss(prior, vocab, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.float64), eps)
    nll = -math.log(math.fsum(prior[0].exp().tolist()) / vocab_size)
    assert got.item() == pytest.approx((1 - eps) * nll - eps / vocab_size * smooth_top.item(), rel=1e-12)
    got.backward()
    p_top = prior[0, 0].exp().item()
    # d/ds_1 of −(ε/V)·V·log p(z1|x) = −ε(1 − p1); the likelihood term (uniform generator) adds nothing
    assert scores.grad[0, 0].item() == pytest.approx(-eps * (1 - p_top), rel=1e-9)
