"""audiosearch: find audio by how it sounds.

The Python API mirrors the CLI: `ingest`, `query`, `Embedder` (AST features
for research use), `collection_info` and `label_counts`. Names are imported
on first use so that `audiosearch --help` does not wait for torch.
"""

from importlib import import_module

_EXPORTS = {
    "ingest": "ingest", "IngestSummary": "ingest",
    "query": "query", "Hit": "query", "QueryResult": "query",
    "Embedder": "embedder", "FileEmbedding": "embedder", "SegmentEmbedding": "embedder",
    "Model": "model", "DEFAULT_MODEL": "model",
    "Collection": "collection", "collection_info": "collection", "label_counts": "collection",
    "AudiosearchError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'audiosearch' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
