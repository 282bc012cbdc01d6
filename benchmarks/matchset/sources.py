"""The library's recordings (and the audio kept out of it): speech, MIDI music, sox synthesis, package sounds,
recorded music from packages.

Every recipe takes its own seeded generator, so a set rebuilt with the same seed is the same set.
Hard negatives are made on purpose: each speech passage is read by two library voices (and by a
third voice outside the library), each melody is played twice in the library (and once more
outside it), each synthesis recipe has another take outside the library.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .midi import Note, Part, write_midi
from .tools import run

RATE = 22050  # Hz of generated files; package sounds keep their own

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please remember to bring your umbrella, the forecast says heavy rain after lunch.",
    "Our train leaves the central station at seventeen minutes past nine.",
    "She sold the old piano to a teacher who lives across the valley.",
    "Turn left at the second traffic light and park behind the bakery.",
    "A gentle breeze carried the smell of fresh bread through the open window.",
    "The committee will publish its final report on the first Monday of April.",
    "Every morning the fisherman checks his nets before the sun comes up.",
    "If the battery is low, the device switches to a power saving mode.",
    "Seven children painted a mural of whales on the wall of the library.",
    "Nobody expected the small team from the north to win the championship.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Thunder rolled over the hills while the cattle gathered under the oak trees.",
    "Could you send me the spreadsheet with last quarter's sales figures?",
    "The museum opens a new exhibition of ancient maps next weekend.",
    "He fixed the bicycle chain with a rusty pair of pliers and some oil.",
    "Low clouds hid the mountain tops for most of the afternoon.",
    "The pilot announced a short delay because of strong winds at the airport.",
    "Bright lanterns floated down the canal during the summer festival.",
    "Write your name at the top of the page and answer every question.",
    "The old clock in the hallway strikes twelve exactly at midnight.",
    "Fresh snow covered the road, so the bus arrived almost an hour late.",
    "My neighbour grows tomatoes, peppers and beans in her tiny garden.",
    "The lecture explains how bridges carry loads across wide rivers.",
    "Volunteers cleaned the beach and collected three hundred bottles.",
    "Put the kettle on, our guests will be here in ten minutes.",
    "The library will be closed on Thursday for repairs to the roof.",
    "A red kite circled slowly above the freshly cut wheat field.",
    "Backups run every night and are kept for thirty days.",
    "The violinist tuned her instrument while the audience found their seats.",
]
# read only outside the library ("unrelated" non-members and the babble), never by a library voice
OUTSIDE_SENTENCES = [
    "The harbour master counted forty sailing boats before the storm arrived.",
    "Grandfather keeps his stamp collection in a green leather album.",
    "Our office moves to the fifth floor of the glass tower in June.",
    "Slice the onions thinly and fry them until they turn golden.",
    "A family of otters was seen playing under the wooden footbridge.",
    "The printer on the second floor has run out of blue ink again.",
    "Heavy fog closed the motorway between the two northern towns.",
    "Her first novel tells the story of a lighthouse keeper and his dog.",
    "Tickets for the late show are sold at the small window on the left.",
    "The orchestra rehearsed the final movement three times on Friday.",
    "Wind turbines on the ridge produce power for twelve villages.",
    "He forgot his keys, so he climbed in through the kitchen window.",
]
FOREIGN = {
    "de": ["Der Zug nach Berlin hat heute leider zwanzig Minuten Verspätung.",
           "Im Sommer fahren wir mit dem Fahrrad an den großen See.",
           "Bitte schließen Sie die Tür, wenn Sie den Raum verlassen."],
    "fr": ["Le marché du samedi matin est plein de fruits et de fleurs.",
           "Nous avons visité le vieux château au bord de la rivière.",
           "Il faut arroser les plantes deux fois par semaine en été."],
    "es": ["El autobús sale de la plaza mayor a las ocho de la mañana.",
           "Mi abuela prepara la mejor sopa de verduras del pueblo.",
           "Mañana vamos a caminar por la montaña si no llueve."],
    "it": ["La biblioteca comunale resta aperta fino alle sette di sera.",
           "Abbiamo mangiato una pizza buonissima vicino al porto.",
           "Il concerto comincia alle nove in piazza del duomo."],
    "pt": ["O navio chegou ao porto depois de uma longa viagem pelo oceano.",
           "A professora explicou a lição com muita paciência."],
    "nl": ["De fietsenstalling bij het station is altijd vol op maandag.",
           "We eten vanavond soep met vers brood van de bakker."],
    "pl": ["Jutro rano pojedziemy pociągiem do Krakowa.",
           "W parku rosną stare dęby i wysokie lipy."],
    "sv": ["Vi åker till skärgården med båt varje sommar.",
           "Det snöade hela natten och vägarna var hala."],
}
VOICES = ["en", "en-us", "en-gb-scotland", "en-029", "en+f3", "en+m3", "en+f2", "en+m7", "en-us+f4",
          "en+klatt", "en+croak", "en+whisper", "en-gb-x-rp", "en+f5", "en-us+m2"]

SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10], "pentatonic": [0, 2, 4, 7, 9],
          "dorian": [0, 2, 3, 5, 7, 9, 10]}
# General MIDI programs: pianos, organ, guitars, bass, strings, brass, reeds, pipes, leads, pads, mallets
BASSES = [32, 33, 34, 35, 38, 39]
PROGRAMS = [0, 1, 4, 6, 11, 13, 16, 19, 21, 24, 25, 26, 29, 32, 40, 41, 42, 46, 48, 52, 56, 57, 60, 61,
            64, 65, 68, 71, 73, 75, 79, 80, 81, 88, 89, 105, 108]


@dataclass(frozen=True)
class Recording:
    """A generated or copied sound: where it lies, what it is, which hard-negative group it shares."""

    path: Path
    kind: str  # speech, music, synth, short, package
    group: str  # recordings sharing a group are alike on purpose (same text, melody, recipe)


# ----------------------------------------------------------------------------- speech
def speech(path: Path, text: str, voice: str, rng: random.Random) -> None:
    """Read a text with espeak-ng at a drawn speed, pitch and word gap, then resample to RATE."""
    raw = path.with_suffix(".espeak.wav")
    run(["espeak-ng", "-v", voice, "-s", str(rng.randint(125, 200)), "-p", str(rng.randint(25, 75)),
         "-g", str(rng.randint(0, 6)), "-w", str(raw), text])
    run(["sox", str(raw), "-r", str(RATE), str(path), "pad", f"{rng.uniform(0.1, 0.6):.2f}",
         f"{rng.uniform(0.1, 0.8):.2f}"])
    raw.unlink()


def passage(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.sample(SENTENCES, rng.randint(lo, hi)))


# ----------------------------------------------------------------------------- music
@dataclass(frozen=True)
class Tune:
    """A melody (and its accompaniment) independent of instrument and tempo."""

    melody: list[Note]
    bass: list[Note]
    drums: list[Note]
    beats: float


def make_tune(rng: random.Random, beats_min: float) -> Tune:
    """A phrase of 2-4 bars varied and repeated to at least `beats_min` beats, with bass and maybe drums."""
    scale = SCALES[rng.choice(sorted(SCALES))]
    root = rng.randint(55, 67)
    steps = [0.5, 0.5, 1, 1, 1, 1.5, 2, 0.25, 0.25]
    phrase, t, deg = [], 0.0, rng.randint(0, len(scale) - 1)
    bars = rng.randint(2, 4)
    while t < 4 * bars:
        d = min(rng.choice(steps), 4 * bars - t)
        deg = max(-3, min(len(scale) + 4, deg + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3])))
        pitch = root + 12 * (deg // len(scale)) + scale[deg % len(scale)]
        if rng.random() > 0.08:
            phrase.append((t, d, pitch))
        t += d
    melody, bass, drums, start = [], [], [], 0.0
    drummed = rng.random() < 0.6
    while start < beats_min:
        shift = rng.choice([0, 0, 0, 2, -2, 5]) if start else 0  # later repeats may be transposed
        for (nt, nd, p) in phrase:
            if start and rng.random() < 0.35:  # and varied: no two stretches of a file are the same audio
                p += rng.choice([-3, -2, -1, 1, 2, 4])
            melody.append(Note(start + nt, nd * 0.9, p + shift, rng.randint(70, 110)))
        for b in range(bars):
            bass.append(Note(start + 4 * b, 1.8, root - 24 + shift + rng.choice([0, 5, 7, 0]), 80))
            bass.append(Note(start + 4 * b + 2, 1.8, root - 24 + shift + rng.choice([0, 7, 3, 5]), 75))
            if drummed:
                for beat in range(4):
                    drums.append(Note(start + 4 * b + beat, 0.1, 36 if beat % 2 == 0 else 38, 90))
                    drums.append(Note(start + 4 * b + beat + 0.5, 0.1, 42, 60))
        start += 4 * bars
    return Tune(melody, bass, drums, start)


# SoX effects that cut the silence (under 0.1 % of full scale) from both ends of a recording.
TRIM_SILENCE = ("silence", "1", "0.02", "0.1%", "reverse", "silence", "1", "0.05", "0.1%", "reverse")


def music(path: Path, tune: Tune, program: int, bass_program: int, bpm: float, font: str,
          rng: random.Random, accompanied: bool, drums: bool = True) -> None:
    """Render a tune with fluidsynth: one instrument for the melody, optional bass and drums."""
    mid = path.with_suffix(".mid")
    parts = [Part(0, program, tune.melody)]
    if accompanied:
        parts += [Part(1, bass_program, tune.bass)] + ([Part(9, 0, tune.drums)] if drums else [])
    write_midi(str(mid), parts, bpm)
    raw = path.with_suffix(".fs.wav")
    run(["fluidsynth", "-ni", "-q", "-g", f"{rng.uniform(0.5, 0.9):.2f}", "-r", str(RATE), "-F", str(raw), font, str(mid)])
    run(["sox", str(raw), "-c", "1", str(path), *TRIM_SILENCE, "pad", "0.2", "0.5"])
    raw.unlink()
    mid.unlink()


# ----------------------------------------------------------------------------- sox synthesis
def _note_hz(rng: random.Random) -> float:
    return 110 * 2 ** (rng.randint(0, 36) / 12)


def synth_segments(recipe: str, rng: random.Random, seconds: float) -> list[list[str]]:
    """Sox `synth` effect chains, one per segment, that together last about `seconds`."""
    segs, total = [], 0.0
    while total < seconds:
        if recipe == "pluck":
            d = rng.choice([0.25, 0.4, 0.6, 0.9])
            chain = ["synth", f"{d}", "pluck", f"{_note_hz(rng):.1f}", "fade", "0", f"{d}", f"{d * 0.8:.2f}"]
        elif recipe == "sweep":
            d = rng.uniform(0.6, 3.0)
            a, b = rng.uniform(80, 1500), rng.uniform(500, 7000)
            wave = rng.choice(["sine", "square", "triangle", "sawtooth"])
            chain = ["synth", f"{d:.2f}", wave, f"{a:.0f}{rng.choice(['-', ':', '+', '/'])}{b:.0f}",
                     "vol", "0.3", "fade", "0.02", f"{d:.2f}", "0.05"]
        elif recipe == "noise":
            d = rng.uniform(0.1, 1.5)
            color = rng.choice(["whitenoise", "pinknoise", "brownnoise"])
            lo = rng.uniform(100, 2000)
            chain = ["synth", f"{d:.2f}", color, "sinc", f"{lo:.0f}-{lo * rng.uniform(1.5, 6):.0f}",
                     "tremolo", f"{rng.uniform(2, 20):.1f}", "60", "fade", "0.01", f"{d:.2f}", f"{d / 3:.2f}"]
        elif recipe == "chord":
            d = rng.uniform(0.8, 2.5)
            notes = [f"{_note_hz(rng):.1f}" for _ in range(3)]
            chain = ["synth", f"{d:.2f}", "sine", notes[0], "sine", notes[1], "triangle", notes[2],
                     "remix", "1-3", "tremolo", f"{rng.uniform(3, 9):.1f}", "40", "vol", "0.3",
                     "fade", "0.05", f"{d:.2f}", "0.2"]
        else:  # "beeps": alarm-like tone patterns with gaps
            d = rng.uniform(0.08, 0.4)
            chain = ["synth", f"{d:.2f}", rng.choice(["square", "sine"]), f"{rng.uniform(400, 3000):.0f}",
                     "vol", "0.25", "fade", "0.005", f"{d:.2f}", "0.01", "pad", "0", f"{rng.uniform(0.05, 0.4):.2f}"]
        segs.append(chain)
        total += float(chain[1]) + (float(chain[-1]) if chain[-3] == "pad" else 0)
    return segs


SYNTH_RECIPES = ("pluck", "sweep", "noise", "chord", "beeps")


def synth(path: Path, recipe: str, rng: random.Random, seconds: float) -> None:
    """Concatenate sox-synthesised segments (each its own chain) into one file."""
    parts = []
    for i, chain in enumerate(synth_segments(recipe, rng, seconds)):
        p = path.with_suffix(f".{i}.wav")
        run(["sox", "-n", "-r", str(RATE), "-c", "1", "-b", "16", str(p), *chain])
        parts.append(p)
    run(["sox", *map(str, parts), str(path), "pad", "0.1", "0.3"])
    for p in parts:
        p.unlink()


SHORT_RECIPES = ("click", "tick", "blip", "chirp", "pluck", "double")


def short(path: Path, recipe: str, rng: random.Random) -> None:
    """A UI-like sound of 0.05-0.5 s."""
    if recipe == "click":
        d = rng.uniform(0.05, 0.08)
        chain = ["synth", f"{d:.3f}", "sine", f"{rng.uniform(1500, 6000):.0f}", "fade", "0", f"{d:.3f}", f"{d * 0.9:.3f}"]
    elif recipe == "tick":
        d = rng.uniform(0.05, 0.1)
        chain = ["synth", f"{d:.3f}", "whitenoise", "sinc", f"{rng.uniform(1000, 4000):.0f}-{rng.uniform(5000, 9000):.0f}",
                 "fade", "0", f"{d:.3f}", f"{d * 0.9:.3f}"]
    elif recipe == "blip":
        d = rng.uniform(0.08, 0.25)
        chain = ["synth", f"{d:.3f}", "triangle", f"{rng.uniform(400, 2000):.0f}", "fade", "0.005", f"{d:.3f}", "0.05"]
    elif recipe == "chirp":
        d = rng.uniform(0.15, 0.5)
        a = rng.uniform(300, 1500)
        chain = ["synth", f"{d:.3f}", "sine", f"{a:.0f}:{a * rng.uniform(1.5, 4):.0f}", "fade", "0.01", f"{d:.3f}", "0.05"]
    elif recipe == "pluck":
        d = rng.uniform(0.2, 0.5)
        chain = ["synth", f"{d:.3f}", "pluck", f"{_note_hz(rng):.1f}", "fade", "0", f"{d:.3f}", f"{d * 0.7:.3f}"]
    else:  # two tones
        d = rng.uniform(0.08, 0.2)
        a = rng.uniform(500, 1500)
        chain = ["synth", f"{d:.3f}", "sine", f"{a:.0f}", "sine", f"{a * rng.choice([1.25, 1.5, 2]):.0f}",
                 "remix", "1-2", "fade", "0.005", f"{d:.3f}", "0.02", "repeat", "1"]
    run(["sox", "-n", "-r", str(RATE), "-c", "1", "-b", "16", str(path), *chain, "vol", f"{rng.uniform(0.3, 0.8):.2f}"])


# ----------------------------------------------------------------------------- package sounds
PACKAGE_GLOBS = ("usr/share/sounds/freedesktop/stereo/*", "usr/share/sounds/alsa/*", "usr/share/sounds/sound-icons/*",
                 "usr/share/sounds/Oxygen-*", "usr/share/games/frozen-bubble/snd/*", "usr/share/games/pingus/data/sounds/*")
PACKAGE_EXT = (".wav", ".oga", ".ogg")


def package_sounds() -> list[Path]:
    """Recordings shipped by installed Debian packages (sound themes, alsa-utils, sound-icons, the sound
    effects of two games), sorted; a game's music is left to `recorded_music`.

    Links and byte-identical copies (sound-icons ships both) are kept once.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for pattern in PACKAGE_GLOBS:
        for p in sorted(Path("/").glob(pattern)):
            if p.suffix.lower() not in PACKAGE_EXT or not p.is_file() or _is_music(p):
                continue
            digest = hashlib.sha1(p.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                found.append(p)
    return found


def package_family(path: Path) -> str:
    """Sounds that may share audio (numbered variants, "-long"/"-cink" versions, one theme's voice prompts)
    form one family; a family goes wholly into the library or wholly outside it."""
    if path.parent.name == "alsa":
        return "alsa"
    words = [w for w in re.split(r"[-_]", path.stem.lower()) if not w.isdigit() and w not in _VARIANT_WORDS]
    return "-".join(words[:2])


_VARIANT_WORDS = {"long", "short", "cink", "very", "serious", "critical"}


def copy_package(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)


# ----------------------------------------------------------------------------- recorded music
# Produced, recorded music shipped by Debian packages (wesnoth-1.16-music: orchestral soundtrack;
# frozen-bubble-data: its themes): what a real library holds, and the one kind here that no
# recipe of ours made. Other tracks of the same soundtrack are the hard negatives.
RECORDED_GLOBS = ("usr/share/games/wesnoth/*/data/core/music/*.ogg", "usr/share/games/frozen-bubble/snd/*zik*.ogg")
RECORDED_PACKAGES = "wesnoth-1.16-music frozen-bubble-data"  # (pingus-data adds sound effects only)
RECORDED_SECONDS = 180  # of each track: the library stays a couple of hours
RECORDED_SKIP = {"silence.ogg"}  # wesnoth's 10 s of digital silence, played between tracks


def _is_music(path: Path) -> bool:
    return any(path.match("/" + g) for g in RECORDED_GLOBS)


def recorded_music() -> list[Path]:
    """The recorded music tracks installed, sorted (none without the packages: the set is smaller)."""
    return sorted(p for g in RECORDED_GLOBS for p in Path("/").glob(g) if p.is_file() and p.name not in RECORDED_SKIP)


def copy_recorded(src: Path, dest: Path) -> None:
    """The track's first RECORDED_SECONDS, mono, silence trimmed from both ends (a query is never silence)."""
    raw = dest.with_suffix(".raw.wav")
    run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), "-t", str(RECORDED_SECONDS), "-ac", "1",
         "-ar", str(RATE), str(raw)])
    run(["sox", str(raw), str(dest), *TRIM_SILENCE])
    raw.unlink()
