"""Edit-tolerant fingerprints and verified matches, beside the embeddings.

The data follows the same path as for embeddings, after decoding:
`fingerprint` (spectral peaks, computed in the decoders) -> SQLite (the
truth) -> `lookup` (the derived index of triplet keys) -> `verify` (one
offset, speed and pitch over enough of the clip) -> `matcher` (files, ranges).
Names are imported on first use: the collection imports `lookup` from here.
"""

from importlib import import_module

_EXPORTS = {"Match": "matcher", "Matcher": "matcher", "match_fingerprint": "matcher", "fingerprint": "fingerprint"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'audiosearch.match' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
