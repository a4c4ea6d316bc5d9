"""What one request may cost and how much work the service holds at once (docs/serving.md#limits).

The cost of a request estimates the token positions the generator processes for it:

    cost = k · (P + b · T · (1 + k if decoding is "thorough" else 1))

k passages, each read once with its prompt (P = `prompt_tokens`, 256 by default: a passage of 100 words and
the question); b beams (1 for greedy) decode up to T = max_new_tokens tokens under every passage; RAG-Sequence
thorough decoding then scores each of the k·b hypotheses under every passage (k·b·k more rows of T). A
retrieval alone costs `RETRIEVE_COST` (one question through the query tower and a search).

Four limits, each a `latentrag serve` flag:
  * max_cost (--max-cost): a request that costs more is refused with 422 before it is queued;
  * max_queue (--max-queue): requests waiting for the worker; one more is refused with 429 + Retry-After;
  * max_pending_cost (--max-pending-cost, default max_cost): the summed cost of the requests waiting and
    running; a request that would exceed it is refused with 503 + Retry-After. With the default, while the
    most expensive allowed request runs every other request is refused at once instead of waiting behind it;
  * timeout_s (--request-timeout): a request not answered by then is dropped (queued: never runs; running:
    its share of the batch stops at the next decoding step) and answered 503.
Retry-After is the pending cost divided by the measured rate (cost per second of the batches so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from latentrag.errors import LatentRagError

PROMPT_TOKENS = 256
RETRIEVE_COST = 32
DEFAULT_MAX_COST = 16_000  # RAG-Token greedy, k = 50, 64 tokens: 34 s of the shipped default on one core
DEFAULT_MAX_QUEUE = 64
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_GRACE_S = 10.0
INITIAL_RATE = 1_000.0  # cost units per second assumed before any batch has been timed


def request_cost(decoding: str, k: int, num_beams: int | None, max_new_tokens: int,
                 prompt_tokens: int = PROMPT_TOKENS) -> int:
    """The cost of one answer (see the module's docstring): an estimate of the token positions processed."""
    beams = 1 if decoding == "greedy" or not num_beams else num_beams
    rescoring = 1 + k if decoding == "thorough" else 1
    return k * (prompt_tokens + beams * max_new_tokens * rescoring)


@dataclass
class Limits:
    max_cost: int = DEFAULT_MAX_COST
    max_queue: int = DEFAULT_MAX_QUEUE
    max_pending_cost: int | None = None  # default: max_cost
    timeout_s: float = DEFAULT_TIMEOUT_S
    grace_s: float = DEFAULT_GRACE_S
    prompt_tokens: int = PROMPT_TOKENS

    def __post_init__(self):
        if self.max_pending_cost is None:
            self.max_pending_cost = self.max_cost
        for name in ("max_cost", "max_queue", "max_pending_cost", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise LatentRagError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_pending_cost < self.max_cost:
            raise LatentRagError(f"--max-pending-cost ({self.max_pending_cost}) must be at least --max-cost "
                                 f"({self.max_cost}), or the most expensive allowed request could never run")
        if not self.timeout_s > 0 or not self.grace_s >= 0:
            raise LatentRagError(f"--request-timeout must be positive and --grace non-negative, got "
                                 f"{self.timeout_s} and {self.grace_s}")


class Rate:
    """Cost units per second of the batches run so far (an exponential average), for Retry-After."""

    def __init__(self, initial: float = INITIAL_RATE):
        self.value = initial
        self.measured = False

    def observe(self, cost: int, seconds: float) -> None:
        if seconds <= 0 or cost <= 0:
            return
        rate = cost / seconds
        self.value = rate if not self.measured else 0.7 * self.value + 0.3 * rate
        self.measured = True

    def seconds(self, cost: float) -> int:
        """Whole seconds to work off `cost` at the measured rate (at least 1)."""
        return max(1, math.ceil(cost / max(self.value, 1e-9)))
