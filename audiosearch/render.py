"""How results look in a terminal: rich tables, the ingest progress bar, summaries."""

from __future__ import annotations

import math
import os
from dataclasses import asdict

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .doctor import DoctorReport, Finding
from .embedder import FileEmbedding
from .export import ExportSummary
from .ingest import IngestSummary
from .query import QueryResult


class _Bar:
    """A rich progress bar on `console`, started and stopped as a context manager."""

    def __init__(self, console: Console, *columns, enabled: bool, transient: bool):
        self.progress = Progress(*columns, console=console, disable=not enabled, transient=transient)
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


class IngestBar(_Bar):
    """Files, segments, audio hours, rate and ETA while an ingest (or `title`: embed) runs."""

    def __init__(self, console: Console, *, enabled: bool = True, title: str = "ingest"):
        # Fits 80 columns with room to spare: elapsed time and ETA must never be the part cut off.
        super().__init__(
            console, TextColumn(f"[bold]{title}"), BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("files"),
            TextColumn("{task.fields[segments]} seg, {task.fields[rate]:.1f}/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), enabled=enabled, transient=False,
        )
        self.segments = 0
        self.seconds = 0.0
        self.files_done = 0
        self.within: dict[str, tuple[int, float]] = {}  # files under way: segments counted, share done

    def start(self, files: int) -> None:
        self.task = self.progress.add_task("ingest", total=files, segments=0, hours=0.0, rate=0.0)

    def update(self, result: FileEmbedding) -> None:
        counted, _ = self.within.pop(result.path, (0, 0.0))
        self.segments += len(result.segments) - counted
        self.seconds += (result.duration or 0.0) if result.status == "ok" else 0.0
        self.files_done += 1
        self._show()

    def advance(self, path: str, new: int, done: int, total: int) -> None:
        """Segments of a file under way: the bar moves by the share of the file done (a 2-hour file is
        one file of many segments), and the segment count and rate follow them."""
        counted, _ = self.within.get(path, (0, 0.0))
        self.within[path] = (counted + new, done / max(total, 1))
        self.segments += new
        self._show()

    def _show(self) -> None:
        elapsed = self.progress.tasks[0].elapsed or 1e-9
        completed = self.files_done + sum(share for _, share in self.within.values())
        self.progress.update(self.task, completed=completed, segments=self.segments, hours=self.seconds / 3600,
                             rate=self.segments / elapsed)


def summary_dict(s: IngestSummary) -> dict:
    data = asdict(s)
    data["failed"] = [{"path": p, "error": e} for p, e in s.failed]
    data["skipped"] = [{"path": p, "reason": e} for p, e in s.skipped]
    data["unlisted_folders"] = [{"path": p, "error": e} for p, e in s.unlisted_folders]
    data["segments_per_second"] = round(s.segments_per_second, 3)
    return data


def print_summary(console: Console, s: IngestSummary) -> None:
    removed = f", {s.removed} removed" if s.pruned else " (pruning off)"
    console.print(
        f"{'[bold red]interrupted:[/] ' if s.interrupted else ''}[bold]{s.added}[/] added, {s.updated} updated, {s.unchanged} unchanged, {s.moved} moved{removed}, "
        f"[{'red' if s.failed else 'green'}]{len(s.failed)} failed[/], {len(s.skipped)} skipped, "
        f"{s.ignored} non-audio ignored" + (f", {plural(len(s.unlisted_folders), 'folder')} unreadable"
                                            if s.unlisted_folders else ""),
        soft_wrap=True, highlight=False,
    )
    if s.segments or s.added or s.updated:
        console.print(
            f"{plural(s.segments, 'segment')} from {duration(s.audio_seconds)} of audio in {s.wall_seconds:.1f} s "
            f"({s.segments_per_second:.1f} segments/s)",
            soft_wrap=True, highlight=False,
        )
    else:
        console.print(f"nothing new to embed (checked in {s.wall_seconds:.1f} s)", highlight=False)
    if s.earlier_failures:
        console.print(f"{plural(s.earlier_failures, 'file')} that failed before left as they were; "
                      "--retry-failed tries them again ('audiosearch info --errors' lists them)", highlight=False,
                      soft_wrap=True)
    if s.index is not None and (s.index.added or s.index.removed or s.index.rebuilt):
        what = "rebuilt" if s.index.rebuilt else "updated"
        why = f" ({s.index.reason})" if s.index.reason else ""
        console.print(f"vector index {what}{why}: +{s.index.added} / -{s.index.removed}", soft_wrap=True,
                      highlight=False)
    for kind, rows in (("failed", s.failed), ("skipped", s.skipped), ("unreadable folder", s.unlisted_folders)):
        for path, error in rows:
            console.print(f"  {kind}: {shown_path(path)}: {error}", highlight=False, markup=False, soft_wrap=True)
    if len(s.ignored_files) > IGNORED_SHOWN:
        console.print(f"  {s.ignored} non-audio files ignored (--json lists them)", highlight=False)
        return
    for path in s.ignored_files:
        console.print(f"  ignored (not audio by its name): {shown_path(path)}", highlight=False, markup=False,
                      soft_wrap=True)


IGNORED_SHOWN = 10  # non-audio files named one by one; above this only counted (all are in --json)


def export_dict(s: ExportSummary) -> dict:
    data = asdict(s)
    data["failed"] = [{"path": p, "error": e} for p, e in s.failed]
    data["skipped"] = [{"path": p, "reason": e} for p, e in s.skipped]
    return data


def print_export(console: Console, s: ExportSummary) -> None:
    console.print(
        f"wrote {plural(s.segments, 'segment')} from {plural(s.files, 'file')} ({duration(s.audio_seconds)} of audio) "
        f"to {escape(s.output)} "
        f"({_size(s.bytes_written)}) in {s.wall_seconds:.1f} s; "
        f"[{'red' if s.failed else 'green'}]{len(s.failed)} failed[/], {len(s.skipped)} skipped",
        soft_wrap=True, highlight=False,
    )
    for kind, rows in (("failed", s.failed), ("skipped", s.skipped)):
        for path, error in rows:
            console.print(f"  {kind}: {path}: {error}", highlight=False, markup=False, soft_wrap=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def plural(n: int, noun: str) -> str:
    """'1 segment', '2 segments', '2 searches'."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}" + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def clock(seconds: float) -> str:
    """Seconds as a reader takes them in: 6.00, 1:05.30, 1:02:03.00."""
    if seconds < 60:
        return f"{seconds:.2f}"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}:{rest:05.2f}"
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:05.2f}"


def duration(seconds: float) -> str:
    """An amount of audio: '13.0 s', '4 min 05 s', '2.50 h'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds / 3600:.2f} h"


def shorten_left(text: str, width: int) -> str:
    """Keep the end of a path (the file name), replacing what does not fit on the left with an ellipsis;
    the cut falls on a folder boundary where one is in reach."""
    name = text.rsplit("/", 1)[-1]
    width = max(width, len(name) + 2)  # the file name itself is never cut
    if len(text) <= width:
        return text
    tail = text[len(text) - max(width - 1, 1):]
    if tail.startswith("/"):
        return "…" + tail
    slash = tail.find("/")
    return "…" + (tail[slash:] if 0 < slash < len(tail) - 1 else tail)


def print_rows(console: Console, header: list[str], rows: list[list[str]], *,
               shorten: int | tuple[int, ...] | None = None) -> None:
    """A table on a terminal; piped, tab-separated lines (header first) that no width ever wraps.

    On a terminal only the last column wraps (between words); `shorten` is the column (a path), or the
    columns, that give up their left end, never a break inside a name, when the table is too wide.
    """
    if not console.is_terminal:
        for row in [header, *rows]:
            print("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row))
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(header):
        table.add_column(name, no_wrap=i != len(header) - 1)
    if shorten is not None:
        paths = (shorten,) if isinstance(shorten, int) else shorten
        last = min(widths[-1], LAST_COLUMN_MIN)
        others = sum(w for i, w in enumerate(widths[:-1]) if i not in paths) + last + 3 * (len(header) - 1) + 2
        width = max(PATH_MIN, (console.width - others) // len(paths))
        rows = [[shorten_left(c, width) if i in paths else c for i, c in enumerate(r)] for r in rows]
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    console.print(table)


LAST_COLUMN_MIN = 16  # characters the last (wrapping) column keeps before a path is shortened
PATH_MIN = 16  # a path is never shortened below this


def hit_columns(*, piped: bool) -> list[str]:
    """The query table's columns (piped: the match's kind, then start and end in seconds);
    a new column goes here and in `hit_row`."""
    match = ["match", "start", "end"] if piped else ["match"]
    return ["rank", "similarity", "path", *match, "labels"]


def hit_row(hit, *, piped: bool) -> list[str]:
    labels = ", ".join(f"{name} ({score:.2f})" for name, score in hit.labels[:3])
    if piped:
        start, end = (hit.match.start, hit.match.end) if hit.match is not None else (hit.start, hit.end)
        match = [hit.kind, f"{start:.2f}", f"{end:.2f}"]
    else:
        match = [match_text(hit)]
    return [str(hit.rank), f"{hit.similarity:.4f}", shown_path(hit.path), *match, labels]


def print_hits(console: Console, result: QueryResult) -> None:
    piped = not console.is_terminal
    predicted = ", ".join(f"{name} ({score:.2f})" for name, score in result.query_labels[:3])
    console.print(f"query labels: {predicted}", highlight=False, markup=False, soft_wrap=True)
    if result.filter_labels:
        how = "the clip's top label" if result.filter_source == "top label" else "--label"
        console.print(f"filter ({how}): {' or '.join(result.filter_labels)} "
                      f"({plural(result.matching or 0, 'matching segment')})", highlight=False, markup=False,
                      soft_wrap=True)
    if not result.hits:
        if result.matching == 0:
            console.print(f"No library segment carries {' or '.join(repr(n) for n in result.filter_labels)}; "
                          "try --no-filter or another --label (see 'audiosearch labels').", highlight=False,
                          markup=False, soft_wrap=True)
        else:
            console.print("No results.")
        return
    rows = [hit_row(hit, piped=piped) for hit in result.hits]
    print_rows(console, hit_columns(piped=piped), rows, shorten=2)


def match_text(hit) -> str:
    """"duplicate 3.20–9.20 ×1.05" (the matched library range, speed; pitch when it differs),
    or "similar 10.24–20.48" (the closest segment); times past a minute as m:ss.ss."""
    match = hit.match
    if match is None:
        return f"similar {clock(hit.start)}–{clock(hit.end)}"
    text = f"duplicate {clock(match.start)}–{clock(match.end)}"
    if abs(match.speed - 1) >= 0.005:
        text += f" ×{match.speed:.2f}"
    if abs(match.pitch - 1) >= 0.005:
        text += f" pitch {12 * math.log2(match.pitch):+.1f} st"
    return text


def edit_text(speed: float, pitch: float) -> str:
    """"×1.05 +0.9 st" (speed, then pitch in semitones), empty for an unchanged copy: how a copy
    differs from the file it matches."""
    parts = []
    if abs(speed - 1) >= 0.005:
        parts.append(f"×{speed:.2f}")
    if abs(pitch - 1) >= 0.005:
        parts.append(f"{12 * math.log2(pitch):+.1f} st")
    return " ".join(parts)


DUPE_COLUMNS = ["group", "kind", "path", "start", "end", "matches", "match_start", "match_end", "speed", "pitch",
                "score", "keep", "reason"]


def dupe_rows(report) -> list[list[str]]:
    """One row per pair (the copy as `path`, the file it matches, better to keep, as `matches`), then one
    per similar pair (score: the cosine): the rows of piped and --csv output."""
    rows = []
    for g in report.groups:
        for p in g.pairs:
            rows.append([str(g.number), p.kind, p.b.path, f"{p.b_start:.2f}", f"{p.b_end:.2f}", p.a.path,
                         f"{p.a_start:.2f}", f"{p.a_end:.2f}", f"{p.speed:.4f}", f"{p.pitch:.4f}", f"{p.score:.3f}",
                         g.keeper.path, g.reason])
    for s in report.similar:
        rows.append(["", "similar", s.b.path, f"{s.b_start:.2f}", f"{s.b_end:.2f}", s.a.path, f"{s.a_start:.2f}",
                     f"{s.a_end:.2f}", "", "", f"{s.cosine:.4f}", "", ""])
    return rows


def print_dupes_csv(report) -> None:
    import csv
    import sys

    writer = csv.writer(sys.stdout)
    writer.writerow(DUPE_COLUMNS)
    writer.writerows(dupe_rows(report))


def print_dupes(console: Console, report) -> None:
    """Groups, each with its keeper and why, then its pairs; then the similar pairs. Piped: TSV."""
    if not console.is_terminal:
        for row in [DUPE_COLUMNS, *dupe_rows(report)]:
            print("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row))
        return
    if not report.groups:
        console.print("No duplicates found.", highlight=False)
    for g in report.groups:
        head = f"group {g.number}: {plural(len(g.files), 'file')}, keep "
        why = f" ({g.reason})"
        keeper = shorten_left(shown_path(g.keeper.path), console.width - len(head) - len(why))
        console.print(f"[bold]{escape(head)}{escape(keeper)}[/]{escape(why)}", highlight=False, soft_wrap=True)
        rows = [[shown_path(p.b.path), f"{clock(p.b_start)}–{clock(p.b_end)}", _relation(p), shown_path(p.a.path),
                 f"{clock(p.a_start)}–{clock(p.a_end)}", edit_text(p.speed, p.pitch)] for p in _shown_pairs(g)]
        print_rows(console, ["file", "range", "is", "of", "range", "edit"], rows, shorten=(0, 3))
    if report.similar_cosine is not None:
        console.print(f"[bold]similar[/] (segments with cosine ≥ {report.similar_cosine:g}; not verified as the same "
                      f"recording): {plural(len(report.similar), 'pair')}", highlight=False, soft_wrap=True)
        if report.similar:
            rows = [[f"{s.cosine:.4f}", shown_path(s.b.path), f"{clock(s.b_start)}–{clock(s.b_end)}",
                     shown_path(s.a.path), f"{clock(s.a_start)}–{clock(s.a_end)}"] for s in report.similar]
            print_rows(console, ["cosine", "file", "segment", "similar to", "segment"], rows, shorten=(1, 3))
    st = report.stats
    where = "" if st.saved else " (read-only index: nothing kept for the next run)"
    console.print(f"{plural(st.fingerprints, 'fingerprinted file')}: {st.matched} matched now, {st.reused} unchanged "
                  f"since the last run; {plural(st.pairs, 'verified pair')} in {st.seconds:.1f} s{where}",
                  highlight=False, soft_wrap=True)


def _shown_pairs(group) -> list:
    """One row per file besides the keeper: its pair with the keeper, else with the best-ranked file it
    matches (--json, --csv and piped output list every pair)."""
    rank = {f.file_id: n for n, f in enumerate(group.files)}
    best: dict[int, object] = {}
    for p in group.pairs:  # `a` is the better of each pair: the row is for `b`
        if p.b.file_id not in best or rank[p.a.file_id] < rank[best[p.b.file_id].a.file_id]:
            best[p.b.file_id] = p
    return sorted(best.values(), key=lambda p: rank[p.b.file_id])


def _relation(pair) -> str:
    """The kind of a pair as the row reads: FILE RANGE <is> whole copy / inside / contains / overlaps OTHER."""
    if pair.kind == "whole":
        return "whole copy"
    if pair.kind == "contained":
        return "inside" if pair.inner == "b" else "container"
    return "overlap"


class DupesBar(_Bar):
    """Files matched and ETA while `dupes` matches fingerprints (shown only when there are many)."""

    def __init__(self, console: Console, *, enabled: bool = True):
        super().__init__(console, TextColumn("[bold]dupes"), BarColumn(bar_width=16), MofNCompleteColumn(),
                         TextColumn("files"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                         enabled=enabled, transient=True)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("dupes", total=total)
        self.progress.update(self.task, completed=done)


def print_explain(console: Console, result: QueryResult) -> None:
    """The search plan, once per distinct plan: a long clip searches once per segment, with the same plan."""
    console.print(f"[bold]plan[/] ({plural(len(result.plans), 'search')}, one per query segment and widening)")
    seen: dict[tuple[str, ...], int] = {}
    for plan in result.plans:
        key = tuple(line for line in plan.explain() if not line.endswith(" ms"))
        seen[key] = seen.get(key, 0) + 1
    for lines, count in seen.items():
        prefix = f"{count}x " if len(seen) > 1 or count > 1 else ""
        for n, line in enumerate(lines):
            console.print(f"  {prefix if n == 0 else ' ' * len(prefix)}{line}", highlight=False, markup=False)
    for stage, seconds in result.timings.items():
        console.print(f"  {stage}: {seconds * 1000:.1f} ms", highlight=False)


def print_info(console: Console, data: dict) -> None:
    if "errors" in data:
        _print_errors(console, data["errors"])
        return
    files = data["files"]
    table = Table(show_header=False)
    table.add_row("index", data["index"])
    table.add_row("model", str(data["model"]))
    table.add_row("precision", data.get("precision") or "not recorded (built before audiosearch recorded it)")
    table.add_row("files", ", ".join(f"{n} {status}" for status, n in sorted(files.items())) or "0")
    table.add_row("segments", str(data["segments"]))
    table.add_row("audio", duration(data["hours"] * 3600))
    table.add_row("hop", f"{data['hop_seconds']:g} s")
    vi = data["vector_index"]
    table.add_row("vector index", ", ".join(f"{k}={v}" for k, v in vi.items()) if vi else "not built yet")
    table.add_row("index current", "yes" if data["index_current"] else "no (rebuilt from SQLite on next use)")
    fp = data["fingerprints"]
    lookup = fp["lookup"]
    table.add_row("fingerprints", f"{fp['files']} of {fp['of']} files"
                  + (f", lookup {lookup['entries']} keys in {lookup['runs']} runs ({lookup['bytes'] / 1e6:.1f} MB)"
                     if lookup else ", lookup not built yet"))
    table.add_row("size on disk", f"{data['size_bytes'] / 1e6:.1f} MB")
    console.print(table)


def _print_errors(console: Console, errors: list[dict]) -> None:
    """`info --errors`: only the files that failed or were skipped, or a line saying there are none."""
    if not errors:
        console.print("no files failed or were skipped")
        return
    for e in errors:
        console.print(f"{e['status']:8} {e['path']}: {e['error']}", highlight=False, markup=False, soft_wrap=True)


def print_doctor(console: Console, report: DoctorReport) -> None:
    console.print(f"index {report.index}: {report.files} files, {report.segments} segments", highlight=False)
    if not report.findings:
        console.print("[green]all checks passed[/]: SQLite integrity, orphan rows, label counts, "
                      "FAISS ids and vectors, print lookup, files on disk")
    _print_findings(console, report.findings)
    if report.repairs:
        console.print("repairs:")
    for line in report.repairs:
        console.print(f"  {line}", highlight=False, markup=False)
    if report.remaining is not None and report.repairs:
        left = [f for f in report.remaining if f.problem]
        console.print("after repair:" if left else "[green]after repair: all problems fixed[/]")
        _print_findings(console, left)
    if not report.ok:
        fixable = any(f.problem and f.repairable for f in report.findings)
        hint = ("" if report.remaining is not None else "; 'audiosearch doctor --repair' fixes those marked fixable"
                if fixable else "; --repair cannot fix these: each line says what to do")
        console.print(f"[red]the index has problems[/]{hint}", highlight=False)


def _print_findings(console: Console, findings: list[Finding]) -> None:
    for f in findings:
        kind = "problem" if f.problem else "note"
        fixable = " [fixable]" if f.problem and f.repairable else ""
        examples = f" (e.g. {', '.join(f.examples)})" if f.examples else ""
        console.print(f"  {kind}{fixable}: {f.message}{examples}", highlight=False, markup=False, soft_wrap=True)


def shown_path(path: str) -> str:
    """Paths under the working directory are shown relative to it; JSON output keeps them absolute."""
    cwd = os.getcwd().rstrip(os.sep) + os.sep
    return path[len(cwd):] if path.startswith(cwd) else path


class ScanBar(_Bar):
    """Recording time scanned, occurrences found, rate and ETA while `scan` runs."""

    def __init__(self, console: Console, *, enabled: bool = True):
        super().__init__(
            console, TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), TextColumn("{task.fields[done]}"),
            TextColumn("{task.fields[found]} found, {task.fields[rate]:.0f}x"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), enabled=enabled, transient=False,
        )
        self.similar_task = None

    def start(self, seconds: float | None) -> None:
        self.task = self.progress.add_task("scan", total=seconds, done="", found=0, rate=0.0)

    def update(self, seconds: float, found: int) -> None:
        self._advance(self.task, seconds, found)

    def similar(self, seconds: float, total: float | None, found: int) -> None:
        """The second pass (`--similar`): recording time embedded, segments listed."""
        if self.similar_task is None:
            self.similar_task = self.progress.add_task("similar", total=total, done="", found=0, rate=0.0)
        self._advance(self.similar_task, seconds, found)

    def _advance(self, task, seconds: float, found: int) -> None:
        state = next(t for t in self.progress.tasks if t.id == task)
        if state.total is not None and seconds > state.total:  # the header's estimate was short
            self.progress.update(task, total=seconds)
        self.progress.update(task, completed=seconds, done=clock(seconds).split(".")[0], found=found,
                             rate=seconds / (state.elapsed or 1e-9))


SCAN_COLUMNS = ["start", "end", "path", "file start", "file end", "speed", "pitch", "score"]


def scan_row(o, *, piped: bool) -> list[str]:
    """One occurrence: on a terminal times as m:ss.ss and pitch in semitones; piped, plain seconds and
    factors (speed: library seconds per recording second; pitch: recording / library frequency)."""
    if piped:
        return [f"{o.start:.2f}", f"{o.end:.2f}", o.path, f"{o.file_start:.2f}", f"{o.file_end:.2f}",
                f"{o.speed:.4f}", f"{o.pitch:.4f}", f"{o.score:.2f}"]
    semitones = round(12 * math.log2(o.pitch), 1) + 0.0 if o.pitch > 0 else 0.0  # + 0.0: no "-0.0"
    return [clock(o.start), clock(o.end), shown_path(o.path), clock(o.file_start), clock(o.file_end),
            f"×{o.speed:.3f}", f"{semitones:+.1f} st", f"{o.score:.2f}"]


def print_scan(console: Console, result) -> None:
    found = plural(len(result.occurrences), "occurrence")
    if console.is_terminal or not result.occurrences:
        console.print(f"{found} in {duration(result.duration)} of {escape(shown_path(result.recording))}",
                      highlight=False)
    if result.occurrences:
        piped = not console.is_terminal
        print_rows(console, SCAN_COLUMNS, [scan_row(o, piped=piped) for o in result.occurrences], shorten=2)
    if result.similar is not None:
        rows = [row for s in result.similar for row in similar_rows(s)]
        if console.is_terminal:
            console.print(f"\nsimilar, not the same recording: {plural(len(result.similar), 'segment')} "
                          "with no occurrence", highlight=False)
        if rows or not console.is_terminal:  # piped: the header even with no rows, as a second table
            print_rows(console, SIMILAR_COLUMNS, rows, shorten=3)


SIMILAR_COLUMNS = ["start", "end", "rank", "path", "similarity", "labels"]


def similar_rows(stretch) -> list[list[str]]:
    """A segment of a scanned recording and the library sounds like it, one row each."""
    return [[f"{stretch.start:.2f}", f"{stretch.end:.2f}", str(h.rank), shown_path(h.path), f"{h.similarity:.4f}",
             ", ".join(name for name, _ in h.labels[:3])] for h in stretch.hits]


def print_scan_csv(result) -> None:
    import csv
    import sys

    writer = csv.writer(sys.stdout)
    writer.writerow([c.replace(" ", "_") for c in SCAN_COLUMNS] + ["inliers"])
    for o in result.occurrences:
        writer.writerow([f"{o.start:.3f}", f"{o.end:.3f}", o.path, f"{o.file_start:.3f}", f"{o.file_end:.3f}",
                         f"{o.speed:.4f}", f"{o.pitch:.4f}", f"{o.score:.3f}", o.inliers])
    if result.similar is not None:  # a second table after a blank line: one row per similar library sound
        writer.writerow([])
        writer.writerow(SIMILAR_COLUMNS)
        for stretch in result.similar:
            writer.writerows(similar_rows(stretch))


class QueryBar(_Bar):
    """A long clip's segments through the model, on stderr, gone once the clip is embedded."""

    MIN_SEGMENTS = 8  # shorter clips take a second or two: no bar

    def __init__(self, console: Console, *, enabled: bool = True):
        super().__init__(
            console, TextColumn("[bold]query"), BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("segments"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), enabled=enabled, transient=True,
        )

    def update(self, clip: str, done: int, total: int) -> None:
        if total < self.MIN_SEGMENTS:
            return
        if self.task is None:
            self.task = self.progress.add_task("query", total=total)
        self.progress.update(self.task, completed=done, total=total)
        if done >= total:
            self.progress.remove_task(self.task)
            self.task = None
