"""A tiny Standard MIDI File writer: enough to render generated melodies with fluidsynth."""

from __future__ import annotations

import struct
from dataclasses import dataclass

TICKS = 480  # per quarter note


@dataclass(frozen=True)
class Note:
    """One note: start and length in quarter notes, MIDI pitch, velocity."""

    start: float
    length: float
    pitch: int
    velocity: int = 90


@dataclass(frozen=True)
class Part:
    """Notes on one channel with one General MIDI program (channel 9 is drums)."""

    channel: int
    program: int
    notes: list[Note]


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def _track(events: list[tuple[int, bytes]]) -> bytes:
    events.sort(key=lambda e: (e[0], e[1][0] & 0xF0 == 0x90))  # note-offs before note-ons at one tick
    data, now = bytearray(), 0
    for tick, msg in events:
        data += _varlen(tick - now) + msg
        now = tick
    data += b"\x00\xff\x2f\x00"
    return b"MTrk" + struct.pack(">I", len(data)) + bytes(data)


def write_midi(path: str, parts: list[Part], bpm: float) -> None:
    """Write a format-1 MIDI file: a tempo track, then one track per part."""
    tempo = round(60_000_000 / bpm)
    tracks = [_track([(0, b"\xff\x51\x03" + tempo.to_bytes(3, "big"))])]
    for part in parts:
        ev: list[tuple[int, bytes]] = []
        if part.channel != 9:
            ev.append((0, bytes([0xC0 | part.channel, part.program])))
        for n in part.notes:
            on = round(n.start * TICKS)
            off = max(on + 1, round((n.start + n.length) * TICKS))
            ev.append((on, bytes([0x90 | part.channel, n.pitch, n.velocity])))
            ev.append((off, bytes([0x80 | part.channel, n.pitch, 0])))
        tracks.append(_track(ev))
    header = b"MThd" + struct.pack(">IHHH", 6, 1, len(tracks), TICKS)
    with open(path, "wb") as f:
        f.write(header + b"".join(tracks))
