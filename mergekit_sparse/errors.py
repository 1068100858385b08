"""The library's exceptions. Every user mistake raises a `SparseMergeError` subclass whose
message says what went wrong, where, and what to do; the CLI prints it as one `Error:` line."""


class SparseMergeError(Exception):
    """Base class for errors caused by inputs or options (not bugs)."""


class CheckpointError(SparseMergeError):
    """A checkpoint cannot be opened or read: missing, corrupt, truncated, pickled, bad index."""


class MismatchError(SparseMergeError):
    """Checkpoints, masks or gradients do not line up: names, shapes."""


class NonFiniteError(SparseMergeError):
    """NaN or Inf found in an input tensor."""


class OptionError(SparseMergeError):
    """An option is out of range or inconsistent with the inputs."""


class OutputError(SparseMergeError):
    """The output cannot be written: exists, equals an input, not writable."""


class DataError(SparseMergeError):
    """A data file (JSONL, accuracy table, config) is malformed."""
