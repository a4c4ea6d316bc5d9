"""Cross-attention in which many decoder rows read one encoder context, stored once.

Decoding runs beams × (question, passage) decoder rows over only B·k encoder contexts. Hugging Face copies
each context's cross-attention keys/values once per beam (and again at every beam reorder): beams-fold
memory and memory traffic in the one part of a decoding step that does almost no arithmetic. Here the
cache keeps one copy per context; each decoder row carries the index of the context it reads
(`context_rows`), and the rows of one context become extra queries of a single attention call over its
keys/values. Cross-attention has no causal mask, so stacking queries changes nothing in the result.

`enable(model)` switches a Hugging Face encoder-decoder to this attention (a registered attention
implementation that is plain SDPA everywhere else) and returns False for architectures it does not know,
whose generators then copy the cache as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NAME = "latentrag_shared_context"
_MARK = "_latentrag_reads_context"


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               context_rows: Tensor | None = None, **kwargs):
    """SDPA; for a marked cross-attention module with `context_rows` (N,), query row i reads context
    context_rows[i] of the (C, H, L, D) keys/values. Returns (N, Tq, H, D) as HF's attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if context_rows is None or not getattr(module, _MARK, False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    contexts, (rows, heads, width, dim) = key.shape[0], query.shape
    counts = torch.bincount(context_rows, minlength=contexts)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :1]  # a context's padding mask is the same for every query
    if bool((counts != counts[0]).any()) or int(counts[0]) * contexts != rows:  # uneven: read copies
        mask = None if attention_mask is None else attention_mask.index_select(0, context_rows)
        return sdpa_attention_forward(module, query, key.index_select(0, context_rows),
                                      value.index_select(0, context_rows), mask, **kwargs)
    per = int(counts[0])
    order = torch.argsort(context_rows, stable=True)
    ordered = not torch.equal(order, torch.arange(rows, device=order.device))
    q = query.index_select(0, order) if ordered else query
    q = q.view(contexts, per, heads, width, dim).transpose(1, 2).reshape(contexts, heads, per * width, dim)
    out, weights = sdpa_attention_forward(module, q, key, value, attention_mask, **kwargs)  # (C, per·Tq, H, D)
    out = out.reshape(rows, width, heads, dim)
    if ordered:
        out = out.index_select(0, torch.argsort(order))
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model: nn.Module) -> bool:
    """Use shared-context cross-attention in `model` if its cross-attention modules are the standard
    `encoder_attn` layers driven by HF's attention interface (BART, mBART, Marian, Pegasus, ...)."""
    if not getattr(model, "_supports_sdpa", False) or getattr(model.config, "_attn_implementation", None) not in (
        "sdpa", NAME,
    ):
        return False
    cross = [m for name, m in model.named_modules() if name.endswith("encoder_attn")]
    if not cross:
        return False
    _register()
    for m in cross:
        setattr(m, _MARK, True)
    model.set_attn_implementation(NAME)
    return True


def disable(model: nn.Module) -> None:
    """Back to plain SDPA (e.g. before saving, so the saved config names a standard implementation)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
