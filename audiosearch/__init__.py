"""audiosearch: find audio by how it sounds.

The Python API mirrors the CLI: `Embedder` (AST features for research use),
`embed_to_file` and `export_index` (feature files, read back with
`read_features`), `collection_info` and `label_counts`; `ingest` and `query`
live in the modules of the same name (`from audiosearch.query import query`),
which is why they are not re-exported here: a submodule would shadow them.
Names are imported on first use so that `audiosearch --help` does not wait
for torch.
"""

from importlib import import_module

_EXPORTS = {
    "IngestSummary": "ingest",
    "Hit": "query", "QueryResult": "query",
    "Embedder": "embedder", "FileEmbedding": "embedder", "SegmentEmbedding": "embedder",
    "embed_to_file": "export", "export_index": "export", "ExportSummary": "export",
    "read_features": "embedding_files", "Features": "embedding_files",
    "Model": "model", "DEFAULT_MODEL": "model",
    "Collection": "collection", "collection_info": "collection", "label_counts": "collection",
    "AudiosearchError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'audiosearch' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
