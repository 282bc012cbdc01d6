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


class IndexDamaged(AudiosearchError):
    """The index's SQLite database is damaged (not a database, malformed pages)."""


def user_error(e: Exception, index: object = None, *, checking: bool = False) -> AudiosearchError | None:
    """The one-line form of a failure that is not a bug, or None.

    A damaged database shows up as sqlite3.DatabaseError from whichever query first reads a bad
    page; its OperationalError subclass (locked, I/O error, read-only) is not damage. `checking`:
    the failure came from `doctor`, which cannot send the user to itself.
    """
    import errno
    import sqlite3

    full = (isinstance(e, sqlite3.OperationalError) and "full" in str(e)
            or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    failing = isinstance(e, sqlite3.OperationalError) and "disk I/O error" in str(e)  # SQLite's word for ENOSPC too
    if full or failing:
        where = f" at {index}" if index is not None else ""
        why = "the disk is full" if full else "disk I/O error (a full or failing disk)"
        return IndexWriteError(f"cannot write to the index{where}: {why}; what was committed is kept, "
                               "and the next run completes it once there is space")
    if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
        where = f" at {index}" if index is not None else ""
        advice = ("restore it from a backup, or move the folder aside and ingest again" if checking
                  else f"run 'audiosearch doctor --index {index}' for details" if index is not None
                  else "run 'audiosearch doctor' for details")
        return IndexDamaged(f"the index database{where} is damaged ({e}); {advice}")
    return None
