"""Where the default index lives: a per-user data folder, not the current folder.

`--index` and AUDIOSEARCH_INDEX win. Otherwise the index is
`$XDG_DATA_HOME/audiosearch/default` (`~/.local/share/audiosearch/default`),
following the XDG base-directory rules that platformdirs applies on Linux,
so `query` finds what `ingest` wrote wherever either is run. An index at the
old default, `./indexes/default`, is still used where it exists, with a note
saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

from .store import DB_NAME

LEGACY_INDEX = Path("indexes/default")


def user_index() -> Path:
    """The per-user default index folder."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "audiosearch" / "default"


def default_index() -> tuple[Path, str | None]:
    """The index to use when none is given, and a note for the user when it is the old one."""
    if (LEGACY_INDEX / DB_NAME).exists():
        return LEGACY_INDEX, (f"note: using ./{LEGACY_INDEX}, the old default index, because it exists here; the "
                              f"default is now {user_index()} (move it there, or pass --index)")
    return user_index(), None
