"""Attention in which many decoding rows read one (question, passage) context that is stored once.

Decoding runs beams × (question, passage) rows (and thorough re-scoring candidates × passages rows) over
only B·k contexts. Hugging Face keeps one copy of a context's keys/values per row and copies them again at
every beam reorder: beams-fold memory and memory traffic, in the part of a step that does almost no
arithmetic. Here each context's keys/values are stored once, each row carries the index of the context it
reads (a `ContextGrid` built from (N,) context indices once per step), and the rows of one context become extra queries of one attention call over
that context's keys/values. Queries never interact, so the result is the same attention.

* seq2seq (BART, mBART, Marian, Pegasus, ...): the cross-attention cache holds one copy per context;
* decoder-only (Llama, Qwen2/3): the prompt's self-attention cache holds one copy per context and each row
  keeps only its own answer keys/values; a row attends to [its context's prompt | its answer so far] with
  one softmax over both parts (joined through their log-sum-exps).

`enable_cross(model)` / `enable_prompt(model)` switch a model to this attention (a registered attention
implementation that is plain SDPA for every other call) and return False for architectures they do not
know, whose generators then copy per row as before. The choice is not saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

NAME = "latentrag_shared_context"
_MARK = "_latentrag_reads_context"
PROMPT_MODELS = ("llama", "qwen2", "qwen3")  # plain causal self-attention with RoPE applied before caching


@dataclass(frozen=True)
class ContextGrid:
    """Which context each of N rows reads, as slots of a (contexts, width) grid: the rows of one context
    side by side (width = the most rows any context has; empty slots are padding). `slots` is None when
    the rows already are that grid, in order. Computed once per decoding step, used by every layer."""

    contexts: int
    width: int
    slots: Tensor | None

    @classmethod
    def of(cls, context_rows: Tensor, contexts: int) -> ContextGrid:
        rows = context_rows.shape[0]
        counts = torch.bincount(context_rows, minlength=contexts)
        width = int(counts.max())
        order = torch.argsort(context_rows, stable=True)
        if width * contexts == rows and torch.equal(order, torch.arange(rows, device=order.device)):
            return cls(contexts, width, None)
        ctx = context_rows[order]
        slot = torch.arange(rows, device=order.device) - (torch.cumsum(counts, 0) - counts)[ctx]
        slots = torch.empty_like(order)
        slots[order] = ctx * width + slot
        return cls(contexts, width, slots)

    def gather(self, x: Tensor) -> Tensor:
        """(N, ...) rows -> (contexts, width, ...) grid (zeros in empty slots)."""
        if self.slots is None:
            return x.view(self.contexts, self.width, *x.shape[1:])
        out = x.new_zeros(self.contexts * self.width, *x.shape[1:])
        out[self.slots] = x
        return out.view(self.contexts, self.width, *x.shape[1:])

    def scatter(self, x: Tensor) -> Tensor:
        """(contexts, width, ...) grid -> (N, ...) rows."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.slots is None else flat.index_select(0, self.slots)


def _cross_attention(module, query, key, value, attention_mask, grid: ContextGrid, **kwargs):
    """Query rows (N, H, Tq, D) read their contexts' (C, H, L, D) keys/values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    contexts, per, (_, heads, width, dim) = grid.contexts, grid.width, query.shape
    q = grid.gather(query)  # (C, per, H, Tq, D)
    q = q.transpose(1, 2).reshape(contexts, heads, per * width, dim)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :1]  # a context's padding mask is the same for every query
    out, weights = sdpa_attention_forward(module, q, key, value, attention_mask, **kwargs)  # (C, per·Tq, H, D)
    return grid.scatter(out.reshape(contexts, per, width, heads, dim)), weights


def _prompt_attention(module, query, key, value, grid: ContextGrid, prompt_cache, prompt_mask, scaling):
    """Causal self-attention of answer rows: query (N, H, t, D) over [prompt of its context | its answer].

    key/value (N, Hkv, a, D) are the row's answer keys/values (the last t are the queries' own positions);
    prompt_cache holds (C, Hkv, Lp, D) per layer, prompt_mask (C, Lp) marks real prompt tokens.
    """
    layer = prompt_cache.layers[module.layer_idx]
    p_key, p_value = layer.keys, layer.values
    contexts, kv_heads, plen, dim = p_key.shape
    rows, heads, t, _ = query.shape
    group, per = heads // kv_heads, grid.width

    # prompt part, one matrix product per context: (C, Hkv, per·group·t, Lp)
    q = grid.gather(query).view(contexts, per, kv_heads, group, t, dim)
    q = q.permute(0, 2, 1, 3, 4, 5).reshape(contexts, kv_heads, per * group * t, dim)
    s = torch.matmul(q, p_key.transpose(-1, -2)) * scaling
    s = s.masked_fill(~prompt_mask[:, None, None, :], float("-inf"))
    p_lse = torch.logsumexp(s, -1, keepdim=True)
    p_out = torch.matmul(torch.exp(s - p_lse), p_value)  # (C, Hkv, per·group·t, D)

    def rows_of(x: Tensor) -> Tensor:  # (C, Hkv, per·group·t, E) -> (N, Hkv, group·t, E)
        x = x.view(contexts, kv_heads, per, group * t, x.shape[-1]).transpose(1, 2)
        return grid.scatter(x)

    p_out, p_lse = rows_of(p_out), rows_of(p_lse)
    # answer part, per row, causal: query j (answer position a - t + j) sees answer keys 0 .. a - t + j
    qa = query.reshape(rows, kv_heads, group * t, dim)
    s = torch.matmul(qa, key.transpose(-1, -2)) * scaling  # (N, Hkv, group·t, a)
    if t > 1:
        a = key.shape[2]
        future = torch.arange(a, device=s.device) > (a - t + torch.arange(t, device=s.device))[:, None]  # (t, a)
        s = s.masked_fill(future.repeat(group, 1), float("-inf"))
    a_lse = torch.logsumexp(s, -1, keepdim=True)
    a_out = torch.matmul(torch.exp(s - a_lse), value)
    # one softmax over both parts
    lse = torch.logaddexp(p_lse, a_lse)
    out = p_out * torch.exp(p_lse - lse) + a_out * torch.exp(a_lse - lse)  # (N, Hkv, group·t, D)
    return out.reshape(rows, heads, t, dim).transpose(1, 2).contiguous(), None


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               context_grid: ContextGrid | None = None, prompt_cache=None, prompt_mask: Tensor | None = None,
               **kwargs):
    """The registered attention: shared-context cross- or prompt attention where the call carries the
    row -> context grid, SDPA otherwise. Returns (N, Tq, H, D) as HF's attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if context_grid is not None and prompt_cache is not None:
        return _prompt_attention(module, query, key, value, context_grid, prompt_cache, prompt_mask,
                                 kwargs["scaling"])
    if context_grid is not None and getattr(module, _MARK, False):
        return _cross_attention(module, query, key, value, attention_mask, context_grid, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register the attention under NAME in transformers' registries (idempotent). A model switched to it
    and unpickled in another process (a Ray actor, a spawned worker) needs this before it runs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _use(model: nn.Module) -> bool:
    """Switch `model` to the registered implementation, if it runs HF's SDPA attention interface."""
    if not getattr(model, "_supports_sdpa", False):
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def enable_cross(model: nn.Module) -> bool:
    """Shared-context cross-attention for an encoder-decoder whose cross-attention layers are the standard
    `encoder_attn` modules driven by HF's attention interface (BART, mBART, Marian, Pegasus, ...)."""
    cross = [m for name, m in model.named_modules() if name.endswith("encoder_attn")]
    if not cross or not _use(model):
        return False
    for m in cross:
        setattr(m, _MARK, True)
    return True


def enable_prompt(model: nn.Module) -> bool:
    """Shared-prompt self-attention for a decoder-only model with plain causal attention (no sliding
    window, no soft-capping): Llama, Qwen2, Qwen3."""
    config = model.config
    if config.model_type not in PROMPT_MODELS or getattr(config, "use_sliding_window", False):
        return False
    return _use(model)

