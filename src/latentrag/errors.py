"""The one exception type a user can cause: it says what was wrong and what to do."""


class LatentRagError(Exception):
    """Bad input or a mismatch the user can fix (bad file, wrong dimension, empty question, ...)."""
