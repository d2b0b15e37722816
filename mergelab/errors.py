"""User-facing errors: one line naming the file and the problem, no traceback by default."""


class MergelabError(Exception):
    """A problem with the user's input or environment, reported as a one-line message."""


class ManifestError(MergelabError):
    """A family manifest that is missing, malformed or points at missing files."""


class CheckpointError(MergelabError):
    """A checkpoint whose tensors are missing, mismatched or not finite."""


class EvalSetError(MergelabError):
    """An eval JSONL that is missing, empty or malformed."""


class HyperparameterError(MergelabError):
    """An unknown merge method or an out-of-range hyperparameter."""


class CacheError(MergelabError):
    """The results cache cannot be opened, read or written."""
