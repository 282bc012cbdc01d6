"""The command line: parse options, call one library function, render the result.

Every expected failure is an AudiosearchError and becomes one line on stderr
with exit code 1; no SQL, FAISS or torch here.
"""

from __future__ import annotations

import gc
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import AudiosearchError, user_error
from .interrupts import Interrupted, sigterm_interrupts

EXIT_CODES = """\b
Exit codes: 0 done; 1 error (nothing or only part was done, see the message);
2 bad command line; 3 ingest done, but some files failed or some folders
could not be read (listed);
130 interrupted by Ctrl-C, 143 by SIGTERM (what was finished is kept)."""

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
    help="Find audio by how it sounds: AST embeddings and AudioSet labels, SQLite + FAISS.\n\n" + EXIT_CODES,
)
out = Console()
err = Console(stderr=True)
EXIT_FILES_FAILED = 3  # ingest finished, but some files or folders could not be read (they are listed)

IndexOpt = Annotated[
    Optional[Path], typer.Option("--index", envvar="AUDIOSEARCH_INDEX", show_envvar=True, metavar="DIR",
                                 help="Index directory [default: ~/.local/share/audiosearch/default].")
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", metavar="ID|DIR", help="Hugging Face id or local checkpoint directory (default: the index's model, "
                 "else MIT/ast-finetuned-audioset-10-10-0.4593)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", metavar="P", help="auto, fp32, bf16, fp16 or int8 (CPU only). auto: bf16 on GPUs and on CPUs with "
    "native bf16; otherwise int8 for ingest and query, fp32 for embed.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, metavar="N", help="Segments per model batch.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, metavar="N", help="Decoding processes; 0 decodes in this process (default: 1 on a CPU, cores-1 on a GPU).")]
HopOpt = Annotated[Optional[float], typer.Option("--hop", min=0.1, metavar="SECONDS", help="Seconds between segment starts (default: 10.24).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (errors as JSON on stderr).")]
DEFAULT_INDEX = None  # resolved by `friendly`: see locations.default_index


def friendly(fn):
    """Turn expected failures into one line (a JSON object with --json) and exit code 1; Ctrl-C and SIGTERM into
    one line and 130 / 143."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if "index" in kwargs and kwargs["index"] is None:
                kwargs["index"] = _default_index(quiet=bool(kwargs.get("as_json")))
            with sigterm_interrupts():
                return fn(*args, **kwargs)
        except AudiosearchError as e:
            _print_error(e, bool(kwargs.get("as_json")))
            raise typer.Exit(1)
        except Exception as e:  # a damaged database, a full disk: known failures from below the library's own checks
            if (known := user_error(e, kwargs.get("index"), checking=fn.__name__ == "doctor")) is None:
                raise
            _print_error(known, bool(kwargs.get("as_json")))
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            interrupted = e if isinstance(e, Interrupted) else Interrupted()
            why = signal.Signals(interrupted.signum).name
            err.print(f"Interrupted ({why}){'; ' + interrupted.message if interrupted.message else ''}.",
                      highlight=False, soft_wrap=True)
            # everything is closed by now: let exit skip the final collection over the whole heap
            # (torch, the model, decoded audio), which took 2 s and would break "stops within 2 s"
            gc.freeze()
            raise typer.Exit(interrupted.exit_code)

    return wrapper


def _print_error(e: AudiosearchError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": str(e), "type": type(e).__name__}, ensure_ascii=False), file=sys.stderr)
    else:
        err.print(f"[bold red]Error:[/] {e}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"audiosearch {version('audiosearch')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Find audio by how it sounds: AST embeddings and AudioSet labels, SQLite + FAISS."""


def _default_index(*, quiet: bool) -> Path:
    from .locations import default_index

    index, note = default_index()
    if note and not quiet:
        err.print(note, highlight=False, markup=False, soft_wrap=True)
    return index


@app.command()
@friendly
def ingest(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Audio files or folders (searched recursively).")],
    index: IndexOpt = DEFAULT_INDEX,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    hop: HopOpt = None,
    prune: Annotated[bool, typer.Option(help="Forget indexed files that are gone from these folders.")] = True,
    retry_failed: Annotated[bool, typer.Option(help="Try again files that failed before.")] = False,
    memory_budget: Annotated[Optional[float], typer.Option(
        min=1e-9, metavar="GIB", help="GiB of vectors FAISS may hold as float32 before it stores them as float16; "
        "remembered by the index (default: 8).")] = None,
    durable: Annotated[bool, typer.Option("--durable", envvar="AUDIOSEARCH_DURABLE", help="Sync every commit to "
        "disk, so that a power loss loses nothing committed (slower; env: AUDIOSEARCH_DURABLE=1).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed new and changed audio under PATHS into the index.

    Exit code 3 means the run finished but some files failed or some folders
    could not be read (they are listed).

    \b
    Example:
        audiosearch ingest ./library --index indexes/sfx
    """
    from .ingest import ingest as run_ingest
    from .render import IngestBar, print_summary, summary_dict

    interrupted = None
    with IngestBar(out, enabled=not as_json) as bar:
        try:
            summary = run_ingest(
                paths, index_dir=index, model=model, device=device, precision=precision, batch_size=batch_size,
                workers=workers, hop_seconds=hop, prune=prune, retry_failed=retry_failed,
                memory_budget_gib=memory_budget, durable=durable or None, progress=bar,
            )
        except Interrupted as e:  # the summary of what was finished, then the usual interrupt line and exit code
            interrupted, summary = e, e.summary
    if as_json:
        print(json.dumps(summary_dict(summary), ensure_ascii=False))
    else:
        print_summary(out, summary)
    if interrupted is not None:
        raise interrupted
    if summary.failed or summary.unlisted_folders:
        raise typer.Exit(EXIT_FILES_FAILED)


@app.command()
@friendly
def query(
    clips: Annotated[list[str], typer.Argument(
        metavar="CLIP", help="Audio clips to search with ('-' reads one from stdin).", show_default=False)],
    k: Annotated[int, typer.Option("-k", min=1, metavar="N", help="Number of results per clip.")] = 10,
    label: Annotated[Optional[list[str]], typer.Option(
        "--label", metavar="NAME", help="Keep items with this label instead of the clip's top label (repeatable; "
        "names: 'audiosearch labels').")] = None,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="Do not filter by label.")] = False,
    segments: Annotated[bool, typer.Option("--segments", help="List segment hits, not one row per file.")] = False,
    duplicates_only: Annotated[bool, typer.Option("--duplicates-only", help="Only verified duplicates (same "
                                                  "recording, possibly edited), no similar items.")] = False,
    similar_only: Annotated[bool, typer.Option("--similar-only", help="Only similar items from the embeddings; "
                                               "skip the fingerprint match.")] = False,
    min_match: Annotated[float, typer.Option("--min-match", min=0.0, help="Seconds of the clip a duplicate must "
                                             "cover.")] = 0.0,
    explain: Annotated[bool, typer.Option("--explain", help="Show the search plan and timings.")] = False,
    index: IndexOpt = DEFAULT_INDEX,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Find the library items that sound most like each CLIP.

    Verified duplicates (the same recording, even re-encoded, cut, noisy, sped
    up or pitch-shifted) come first, with where they match; then similar items
    from the embeddings, filtered by the clip's top predicted label, so fewer
    than -k rows can come back. --label NAME picks the label instead (see
    'audiosearch labels' for names), --no-filter searches everything. The
    filter never hides a duplicate. With --json each clip prints one JSON
    object per line (schema: README).

    \b
    Example:
        audiosearch query door_slam.wav -k 5 --label "Door"
    """
    from .query import query_clips
    from .render import QueryBar, print_explain, print_hits

    if duplicates_only and similar_only:
        raise AudiosearchError("--duplicates-only and --similar-only exclude each other; give one of them")
    kinds = "duplicates" if duplicates_only else "similar" if similar_only else "all"
    with _stdin_clips(clips) as paths, QueryBar(err, enabled=err.is_terminal) as bar:
        results = query_clips(
            paths, index_dir=index, k=k, labels=label, filter=not no_filter, per_file=not segments,
            model=model, device=device, precision=precision, kinds=kinds, min_match_seconds=min_match,
            progress=bar,
        )
        for n, result in enumerate(results):
            if as_json:
                print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
            else:
                if len(paths) > 1:
                    out.print(("\n" if n else "") + f"[bold]{escape(clips[n])}[/]", highlight=False)
                print_hits(out, result)
            if explain:
                print_explain(err if as_json else out, result)


@app.command()
@friendly
def dupes(
    min_seconds: Annotated[float, typer.Option("--min-seconds", min=0.0, metavar="SECONDS", help="Shortest shared "
                                               "passage to report.")] = 0.0,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", metavar="KIND", help="Only pairs of this kind: whole, "
                                                      "contained or partial (repeatable).")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", metavar="NAME", help="Only files with a segment "
                                                       "carrying this label (repeatable).")] = None,
    similar: Annotated[Optional[float], typer.Option("--similar", min=-1.0, max=1.0, metavar="COSINE", help="Also list "
                       "pairs of files whose segment embeddings are this close, not verified as the same recording.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Match every file again, not only new and changed ones.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV rows (one per pair) on stdout.")] = False,
    index: IndexOpt = DEFAULT_INDEX,
    as_json: JsonOpt = False,
) -> None:
    """Find groups of files that hold the same audio, and which file of each to keep.

    Whole copies (re-encoded, resampled, louder, sped up, pitch-shifted),
    files contained in others (excerpts, trims) and partial overlaps, each
    pair with the matched range in both files, speed and pitch; each group
    suggests a keeper (lossless, higher rate and bit depth, longer, then path
    order) and says why. Results are kept in the index: a later run matches
    only new and changed files. --similar adds near-duplicates by embedding,
    marked "similar", never "duplicate".

    \b
    Example:
        audiosearch dupes --kind whole --min-seconds 5
    """
    from .match.dupes import KINDS, find_dupes
    from .render import DupesBar, print_dupes, print_dupes_csv

    if unknown := sorted(set(kind or []) - set(KINDS)):
        raise AudiosearchError(f"unknown --kind {unknown[0]!r}; give one of {', '.join(KINDS)}")
    if as_json and as_csv:
        raise AudiosearchError("--json and --csv exclude each other; give one of them")
    with DupesBar(err, enabled=err.is_terminal and not (as_json or as_csv)) as bar:
        report = find_dupes(index, min_seconds=min_seconds, kinds=kind, labels=label, similar=similar, full=full,
                            progress=bar)
    _emit(report, as_json=as_json, as_csv=as_csv, table=print_dupes, csv=print_dupes_csv)


@app.command()
@friendly
def scan(
    recording: Annotated[Path, typer.Argument(metavar="RECORDING", help="A long audio file to search through.")],
    min_seconds: Annotated[float, typer.Option("--min-seconds", min=0.0, metavar="SECONDS",
                                               help="Shortest occurrence to report.")] = 0.0,
    similar: Annotated[Optional[int], typer.Option("--similar", min=1, max=100, metavar="K", help="Also, for each "
                       "10.24 s segment with no occurrence, the K library sounds nearest to it by embedding (loads "
                       "the model).")] = None,
    index: IndexOpt = DEFAULT_INDEX,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print comma-separated rows (header first).")] = False,
) -> None:
    """Find every place in RECORDING where audio of the index's files occurs.

    Each occurrence gives the recording's range, the library file and its range,
    the speed and pitch factors and a score. The recording is streamed (memory
    stays flat however long it is); no model is loaded unless --similar asks
    what the rest of the recording sounds like.

    \b
    Example:
        audiosearch scan broadcast.flac --index indexes/sfx --min-seconds 2
    """
    from .match.scan import scan as run_scan
    from .render import ScanBar, print_scan, print_scan_csv

    with ScanBar(err, enabled=err.is_terminal and not (as_json or as_csv)) as bar:
        result = run_scan(recording, index_dir=index, min_seconds=min_seconds, similar=similar, model=model,
                          device=device, precision=precision, progress=bar)
    _emit(result, as_json=as_json, as_csv=as_csv, table=print_scan, csv=print_scan_csv)


def _emit(result, *, as_json: bool, as_csv: bool, table, csv) -> None:
    """A report as JSON, as CSV or as the table for people (`table(console, result)`, `csv(result)`)."""
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    elif as_csv:
        csv(result)
    else:
        table(out, result)


@app.command()
@friendly
def serve(
    index: IndexOpt = DEFAULT_INDEX,
    host: Annotated[str, typer.Option("--host", metavar="ADDR", help="Address to listen on; any but this "
                                      "machine's (127.0.0.1, ::1) needs --token or --insecure.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT",
                                      help="Port to listen on (0: any free one).")] = 8000,
    token: Annotated[Optional[str], typer.Option("--token", envvar="AUDIOSEARCH_TOKEN", metavar="SECRET",
                                                 help="Every request must carry it (the printed URL does).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Listen beyond this machine with no token.")] = False,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, metavar="MIB",
                                                 help="Largest clip upload accepted.")] = 64.0,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Search and listen in a browser: load the index and model once, serve a page and a JSON API.

    Prints the URL to open. API: POST /api/query, GET /api/files/{id}/audio,
    /api/labels, /api/library, /api/info; OpenAPI at /docs.

    \b
    Example:
        audiosearch serve --index indexes/sfx --port 8000
    """
    from .serve.server import serve as run_server
    from .serve.service import Limits

    def announce(line: str) -> None:
        (err if line.startswith("WARNING") else out).print(line, highlight=False, markup=False, soft_wrap=True)

    run_server(index, host=host, port=port, token=token, insecure=insecure, model=model, device=device,
               precision=precision, limits=Limits(upload_bytes=int(max_upload_mb * (1 << 20))), announce=announce)


@contextmanager
def _stdin_clips(clips: list[str]) -> Iterator[list[str]]:
    """The clips as paths, '-' replaced by a temporary file holding what stdin sent."""
    if clips.count("-") > 1:
        raise AudiosearchError("'-' (stdin) can be given once")
    if "-" not in clips:
        yield clips
        return
    with tempfile.NamedTemporaryFile(prefix="audiosearch-stdin-") as tmp:
        shutil.copyfileobj(sys.stdin.buffer, tmp)
        tmp.flush()
        yield [tmp.name if c == "-" else c for c in clips]


@app.command()
@friendly
def info(
    index: IndexOpt = DEFAULT_INDEX,
    errors: Annotated[bool, typer.Option("--errors", help="List files that failed or were skipped.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what an index holds."""
    from .collection import collection_info
    from .render import print_info

    data = collection_info(index, errors=errors)
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        print_info(out, data)


@app.command()
@friendly
def labels(
    index: IndexOpt = DEFAULT_INDEX,
    all_labels: Annotated[bool, typer.Option("--all", help="List the model's whole vocabulary, "
                                             "also labels no segment carries.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List predicted labels with the number of segments carrying each (the names --label takes)."""
    from .collection import label_counts

    counts = label_counts(index, all_labels=all_labels)
    if as_json:
        print(json.dumps([{"label": name, "segments": n} for name, n in counts], ensure_ascii=False))
        return
    from .render import print_rows

    print_rows(out, ["label", "segments"], [[name, str(n)] for name, n in counts])


@app.command()
@friendly
def remove(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Indexed files, or folders whose indexed files go.")],
    index: IndexOpt = DEFAULT_INDEX,
    as_json: JsonOpt = False,
) -> None:
    """Drop files from the index; the files on disk are not touched.

    \b
    Example:
        audiosearch remove library/old_takes
    """
    from .collection import remove_files
    from .render import plural

    removed, unknown = remove_files(index, paths)
    if as_json:
        print(json.dumps({"removed": removed, "not_indexed": unknown}, ensure_ascii=False))
    else:
        out.print(f"{plural(len(removed), 'file')} removed from the index", highlight=False)
        for path in unknown:
            out.print(f"  not in the index: {path}", highlight=False, markup=False, soft_wrap=True)
    if unknown and not removed:
        raise typer.Exit(1)


OutputOpt = Annotated[
    Path, typer.Option("-o", "--output", metavar="FILE", help="Feature file; the extension picks the format: .parquet, .npz or .npy.")
]
TopLabelsOpt = Annotated[
    Optional[int], typer.Option("--top-labels", min=1, metavar="N", help="Keep the N best labels per segment (names + scores).")
]
Float16Opt = Annotated[bool, typer.Option("--float16", help="Store embeddings, scores and tokens as float16.")]
EmbedModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", metavar="ID|DIR", help="Hugging Face id or local checkpoint directory "
                 "(default: MIT/ast-finetuned-audioset-10-10-0.4593)."),
]


@app.command()
@friendly
def embed(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Audio files or folders (searched recursively).")],
    output: OutputOpt = Path("features.parquet"),
    model: EmbedModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    hop: HopOpt = None,
    top_labels: TopLabelsOpt = None,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="Also store the last-layer patch tokens [T', F', D].")
    ] = False,
    float16: Float16Opt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compute AST features for PATHS into a file, without an index.

    \b
    Example:
        audiosearch embed ./library -o features.parquet --top-labels 5
    """
    from .export import embed_to_file
    from .render import IngestBar

    with IngestBar(out, enabled=not as_json, title="embed") as bar:
        summary = embed_to_file(
            paths, output, model=model, device=device, precision=precision, batch_size=batch_size, workers=workers,
            hop_seconds=hop, top_labels=top_labels, tokens=tokens, float16=float16, progress=bar,
        )
    _show_export(summary, as_json)


@app.command()
@friendly
def export(
    index: IndexOpt = DEFAULT_INDEX,
    output: OutputOpt = Path("features.parquet"),
    top_labels: TopLabelsOpt = None,
    float16: Float16Opt = False,
    tokens: Annotated[bool, typer.Option("--tokens", hidden=True)] = False,  # not offered: explained if tried
    as_json: JsonOpt = False,
) -> None:
    """Write the features an index holds to a file, as stored: nothing is recomputed.

    An index keeps no patch tokens: 'audiosearch embed --tokens' computes them.

    \b
    Example:
        audiosearch export --index indexes/sfx -o features.npz
    """
    from .export import export_index

    if tokens:
        raise AudiosearchError("an index keeps no patch tokens; use 'audiosearch embed --tokens' to compute them")
    summary = export_index(index, output, top_labels=top_labels, float16=float16)
    _show_export(summary, as_json)


def _show_export(summary, as_json: bool) -> None:
    from .render import export_dict, print_export

    if as_json:
        print(json.dumps(export_dict(summary), ensure_ascii=False))
    else:
        print_export(out, summary)


@app.command()
@friendly
def doctor(
    index: IndexOpt = DEFAULT_INDEX,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed: delete orphan rows, rebuild the "
                                         "FAISS file from SQLite.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check that the index agrees with itself and with the files on disk; exit code 1 if something is wrong.

    \b
    Example:
        audiosearch doctor --index indexes/sfx --repair
    """
    from .doctor import doctor as run_doctor
    from .render import print_doctor

    report = run_doctor(index, repair=repair)
    if as_json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print_doctor(out, report)
    if not report.ok:
        raise typer.Exit(1)
