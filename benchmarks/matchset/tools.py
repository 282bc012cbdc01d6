"""The command-line tools the matching benchmark needs, and one clear message when one is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/sounds/sf3/default-GM.sf3")

# tool -> Debian package that provides it
BUILD_TOOLS = {"sox": "sox libsox-fmt-all", "ffmpeg": "ffmpeg", "espeak-ng": "espeak-ng", "fluidsynth": "fluidsynth"}
INSTALL_HINT = ("apt-get install -y sox libsox-fmt-all ffmpeg espeak-ng fluidsynth fluid-soundfont-gm "
                "libchromaprint-tools sound-theme-freedesktop wesnoth-1.16-music frozen-bubble-data pingus-data")


def require_build_tools() -> str:
    """Exit with one line naming what is missing; return the General MIDI soundfont's path."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    font = next((f for f in SOUNDFONTS if Path(f).exists()), None)
    if font is None:
        missing.append("fluid-soundfont-gm")
    if missing:
        sys.exit(f"error: the matching test set needs {', '.join(missing)}: install with `{INSTALL_HINT}`")
    return font


def run(cmd: list[str]) -> None:
    """Run a tool; on failure raise with its last stderr line (the builder reports and stops).

    SoX runs repeatable (`-R`): otherwise its dither, applied whenever it writes 16 bits from more,
    draws a fresh seed each run, and a set rebuilt from the same seed differed in most synthesised
    and MIDI files and in three queries in four (md5), moving borderline rows by a query or two.
    """
    if cmd[0] == "sox":
        cmd = [cmd[0], "-R", *cmd[1:]]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {tail}\n  command: {' '.join(cmd)}")


def version(cmd: list[str]) -> str:
    """First line a tool prints about its version, or 'missing'."""
    if shutil.which(cmd[0]) is None:
        return "missing"
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"
