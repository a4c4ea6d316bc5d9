"""Stopping a decoding between two steps: a caller (the HTTP service) installs a check on its thread and
every decoding loop calls `checkpoint()` once per step; the check raises to stop (its exception propagates
out of `model.generate`). Without a check installed, `checkpoint()` does nothing.

    with interruptible(lambda: raise_if_every_client_left()):
        model.generate(questions, mode="sequence", decoding="thorough")   # any decoding, any mode
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_local = threading.local()


@contextlib.contextmanager
def interruptible(check: Callable[[], None]) -> Iterator[None]:
    """Call `check()` at every decoding step run by this thread inside the block (nested blocks stack)."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


def checkpoint() -> None:
    """One decoding step is about to run: let the installed check (if any) raise to stop it."""
    check = getattr(_local, "check", None)
    if check is not None:
        check()
