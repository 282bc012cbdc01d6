"""Which checkpoint a model name means, decided before torch is imported.

A name is either a local checkpoint directory or a Hugging Face hub id. A
local directory is recorded as its absolute path, so an index built with
`--model tiny-ast` still finds its model when queried from another folder;
a hub id is recorded as the id. A recorded path that is gone, a checkpoint
that cannot be read, or a hub id that is neither cached nor reachable is
reported at once, instead of after the hub client's network retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 2.0  # how long the one reachability probe may take before the hub counts as offline


def model_reference(name: str) -> str:
    """What an index records for `name`: the absolute path of a local checkpoint, else the hub id as given."""
    local = Path(name).expanduser()
    if local.exists():
        return str(local.resolve())
    return name


def looks_like_path(name: str) -> bool:
    """A name no hub id can be: absolute, relative to here or home, or more than one '/'."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name in (".", "..")


def check_model_available(name: str) -> None:
    """Raise ModelLoadError at once when `name` cannot be loaded: a missing or unreadable local
    checkpoint, or (offline) a hub id that is not in the local cache."""
    local = Path(name).expanduser()
    if local.exists():
        _check_readable(local)
        return
    if looks_like_path(name):
        raise ModelLoadError(f"model checkpoint {name} does not exist; pass --model with the folder it moved to")
    if _hub_cached(name):
        return
    if offline():
        raise ModelLoadError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
            "reached (offline); pass --model /path/to/a/saved/checkpoint"
        )


def _check_readable(local: Path) -> None:
    unreadable = [p.name for p in (local, *local.glob("*")) if not os.access(p, os.R_OK)]
    if unreadable:
        raise ModelLoadError(
            f"cannot read model checkpoint {local}: permission denied for {', '.join(sorted(unreadable))} "
            "(chmod a+r them)"
        )


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, or the hub host not reachable within HUB_PROBE_SECONDS."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS):
            return False
    except OSError:
        return True


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed id: let the loader say what is wrong with it
        return False
    return isinstance(found, str)
