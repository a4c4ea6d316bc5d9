"""Shared-context cross-attention: one copy of a passage's keys/values for all its beams gives the same
attention, the same decoding, and leaves saved models loadable by plain transformers."""

import pytest
import torch
from tiny_models import tiny_decoder_only_generator, tiny_passages, tiny_seq2seq_generator
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from latentrag.generation import shared_context
from latentrag.generation.decoding import DecodeOptions, rag_sequence_decode, rag_token_decode
from latentrag.marginals import retrieval_log_prior


class _Cross(torch.nn.Module):
    is_causal = False


@pytest.mark.parametrize("context_rows", [[2, 0, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2], [1, 0, 0, 2, 2, 2, 0]],
                         ids=["permuted", "contiguous", "uneven"])
def test_rows_read_their_context(context_rows):
    torch.manual_seed(0)
    module = _Cross()
    setattr(module, shared_context._MARK, True)
    rows = torch.tensor(context_rows)
    q = torch.randn(len(rows), 2, 3, 4)  # (N, H, Tq, D)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    mask = torch.zeros(3, 1, 3, 5)
    mask[1, ..., 3:] = float("-inf")  # context 1 is padded
    out, _ = shared_context._attention(module, q, k, v, mask, context_grid=shared_context.ContextGrid.of(rows, 3), scaling=0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k[rows], v[rows], attn_mask=mask[rows], scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def _decode_both_ways(gen, fn):
    passages = tiny_passages()
    batch = gen.prepare(["who wrote hamlet", "what is the capital of france"], [passages[:3], passages[1:4]])
    log_prior = retrieval_log_prior(torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.0, -1.0]]))
    shared = fn(gen, batch, log_prior)
    gen.shares_contexts = False  # the copying path
    copied = fn(gen, batch, log_prior)
    gen.shares_contexts = True
    return shared, copied


def test_prompt_rows_read_their_context_and_own_answer():
    """Row i attends causally to [prompt of context_rows[i] (padding masked) | its own answer keys]."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    module = _Cross()
    module.layer_idx = 0
    contexts, kv_heads, heads, plen, dim, past, t = 3, 2, 4, 6, 8, 2, 3
    rows = torch.tensor([2, 0, 2, 1, 0, 2])
    prompt = DynamicCache()
    pk, pv = torch.randn(contexts, kv_heads, plen, dim), torch.randn(contexts, kv_heads, plen, dim)
    prompt.update(pk, pv, 0)
    pmask = torch.ones(contexts, plen, dtype=torch.bool)
    pmask[1, :2] = False  # context 1 is left-padded
    q = torch.randn(len(rows), heads, t, dim)
    ak, av = torch.randn(len(rows), kv_heads, past + t, dim), torch.randn(len(rows), kv_heads, past + t, dim)
    out, _ = shared_context._attention(module, q, ak, av, None, context_grid=shared_context.ContextGrid.of(rows, contexts),
                                       prompt_cache=prompt,
                                       prompt_mask=pmask, scaling=0.3)
    keys = torch.cat([pk[rows], ak], 2).repeat_interleave(heads // kv_heads, 1)
    values = torch.cat([pv[rows], av], 2).repeat_interleave(heads // kv_heads, 1)
    allowed = torch.ones(len(rows), 1, t, plen + past + t, dtype=torch.bool)
    allowed[..., :plen] = pmask[rows][:, None, None, :]
    for j in range(t):
        allowed[:, :, j, plen + past + j + 1 :] = False
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["token-beam", "sequence-thorough"])
@pytest.mark.parametrize("kind", ["seq2seq", "decoder-only"])
def test_decoding_is_unchanged_by_sharing(mode, kind):
    gen = tiny_seq2seq_generator(seed=3) if kind == "seq2seq" else tiny_decoder_only_generator(seed=3)
    assert gen.shares_contexts
    opts = DecodeOptions(max_new_tokens=6, num_beams=3)
    if mode == "token-beam":
        def fn(g, b, p):
            return rag_token_decode(g, b, p, opts)
    else:
        def fn(g, b, p):
            return rag_sequence_decode(g, b, p, opts, "thorough")
    shared, copied = _decode_both_ways(gen, fn)
    assert [d.token_ids for d in shared] == [d.token_ids for d in copied]
    for a, b in zip(shared, copied, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
        torch.testing.assert_close(a.posterior, b.posterior, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["seq2seq", "decoder-only"])
def test_saved_generator_loads_with_plain_transformers(tmp_path, kind):
    gen = tiny_seq2seq_generator(seed=0) if kind == "seq2seq" else tiny_decoder_only_generator(seed=0)
    gen.save_pretrained(tmp_path)
    assert gen.shares_contexts and gen.model.config._attn_implementation == shared_context.NAME
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    assert auto.from_pretrained(tmp_path).config._attn_implementation != shared_context.NAME


def test_unknown_architectures_keep_per_row_caches():
    """A decoder-only model the shared prompt attention does not know (GPT-2) decodes with per-row caches."""
    from tiny_models import llama_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from latentrag.generation.generators import DecoderOnlyGenerator

    tokenizer = llama_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=512, eos_token_id=tokenizer.eos_token_id)).eval()
    gen = DecoderOnlyGenerator(model, tokenizer, "tiny-gpt2")
    assert not gen.shares_contexts and model.config._attn_implementation != shared_context.NAME
    passages = tiny_passages()
    batch = gen.prepare(["who wrote hamlet"], [passages[:3]])
    out = rag_sequence_decode(gen, batch, retrieval_log_prior(torch.tensor([[0.3, -0.2, 0.1]])),
                              DecodeOptions(max_new_tokens=4, num_beams=2), "thorough")
    assert len(out) == 1 and torch.isfinite(out[0].doc_log_likelihood).all()
