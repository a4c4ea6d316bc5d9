"""One fixed way of calling a tokenizer, safe to call from many threads at once.

A fast (Rust-backed) tokenizer keeps its padding and truncation settings as state of its backend, and
transformers rewrites that state on every call whose settings differ from the previous call's (padding
side, truncation, max length, padding or not). One tokenizer called two ways from two threads therefore
races: a call runs with the other's settings, or fails with "RuntimeError: Already borrowed"
(huggingface/tokenizers#537, transformers#47085). Flipping `tokenizer.padding_side` around a call, as a
per-call setting, is the same race one level up.

`FixedTokenizer` owns a private copy called one way only: the sides are set on the copy once, its
backend state is settled by one call at construction, and every later call with the same settings only
reads it. The tokenizer handed in is never modified.
"""

from __future__ import annotations

import copy


class FixedTokenizer:
    """`tokenizer` copied once and always called with the same keyword arguments.

    padding_side/truncation_side: "left" or "right" on the copy (None keeps the tokenizer's). Per-call
    arguments that change the backend state (padding, truncation, max_length) belong in `fixed`; a call may
    pass `max_length` again (a generator's `max_input_length` may be changed between calls).
    """

    def __init__(self, tokenizer, padding_side: str | None = None, truncation_side: str | None = None, **fixed):
        self.tokenizer = copy.deepcopy(tokenizer)
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        if truncation_side is not None:
            self.tokenizer.truncation_side = truncation_side
        self.fixed = fixed
        self(["a"])  # settle the backend's padding/truncation state now, not in concurrent first calls

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **{**self.fixed, **kwargs})
