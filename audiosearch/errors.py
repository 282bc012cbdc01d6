"""Exceptions that carry a message a user can act on.

The CLI turns every `AudiosearchError` into one line on stderr and a non-zero
exit; anything else is a bug and keeps its traceback.
"""


class AudiosearchError(Exception):
    """Base class: an expected failure with a user-facing message."""


class AudioDecodeError(AudiosearchError):
    """A file could not be read as audio."""


class IndexNotFound(AudiosearchError):
    """The index directory holds no audiosearch database."""


class ModelMismatch(AudiosearchError):
    """An index is used with a model other than the one that built it."""


class ModelLoadError(AudiosearchError):
    """A checkpoint could not be loaded (missing, not an AST, no safetensors)."""


class IndexLocked(AudiosearchError):
    """Another process is writing to the index."""


class UnknownLabel(AudiosearchError):
    """A label name that the model does not predict."""


class NoAudioFiles(AudiosearchError):
    """A path holds no audio files to ingest."""


class FeatureFileError(AudiosearchError):
    """A feature file cannot be written or read as asked."""


class IndexWriteError(AudiosearchError):
    """The index could not be written (disk full, I/O error); what was committed before is kept."""


class EmptyIndex(AudiosearchError):
    """An index that holds no segments yet: nothing to search."""
