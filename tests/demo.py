"""Build the README's demo: the generated test library and the test checkpoint, offline.

    python -m tests.demo demo      # writes demo/library and demo/tiny-ast
"""

from __future__ import annotations

import sys
from pathlib import Path

from audiosearch import synthetic as syn

from .conftest import TINY_CONFIG, labelled_segments, make_library, set_discriminative_head


def main(root: str = "demo") -> None:
    library = make_library(Path(root) / "library")
    model = syn.save_random_checkpoint(Path(root) / "tiny-ast", **TINY_CONFIG)
    set_discriminative_head(model, labelled_segments(library))
    print(f"wrote {library} and {model}")


if __name__ == "__main__":
    main(*sys.argv[1:])
