"""The one exception type a user can cause (it says what was wrong and what to do), and its warning."""


class LatentRagError(Exception):
    """Bad input or a mismatch the user can fix (bad file, wrong dimension, empty question, ...)."""


class LatentRagWarning(UserWarning):
    """Input that still gives an answer, but a worse one than the user likely expects (e.g. a cut prompt)."""
