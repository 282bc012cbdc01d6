"""SQLite, the source of truth: files, segments (with their vectors), labels, metadata.

The FAISS index is derived from the `segments` table and can always be
rebuilt from it. Segment ids come from AUTOINCREMENT, so an id is never
reused and the FAISS id of a deleted segment can never point at new audio.
Every write bumps `meta.generation`; the index records the generation it
reflects, which is how a stale index is noticed after a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import sqlite_utils
from sqlite_utils.migrations import Migrations

from .errors import IndexNotFound, IndexWriteError

DB_NAME = "audiosearch.db"
TOP_LABELS = 5  # labels stored per segment for filtering
LABEL_MIN_SCORE = 0.1  # below this a label is not "predicted" (the top one is always kept)

migrations = Migrations("audiosearch")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER, mtime REAL, hash TEXT,
            duration REAL, sample_rate INTEGER, channels INTEGER,
            status TEXT NOT NULL,            -- ok | failed | skipped | pending
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            updated REAL
        );
        CREATE INDEX files_hash ON files(hash);
        CREATE TABLE segments (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id
            file_id INTEGER NOT NULL REFERENCES files(id),
            start REAL NOT NULL, "end" REAL NOT NULL,
            vector BLOB NOT NULL,                  -- float32 little-endian, unit norm
            scores BLOB NOT NULL                   -- float16 sigmoid scores over all labels
        );
        CREATE INDEX segments_file ON segments(file_id);
        CREATE TABLE labels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, count INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE segment_labels (
            label_id INTEGER NOT NULL, segment_id INTEGER NOT NULL, score REAL NOT NULL,
            PRIMARY KEY (label_id, segment_id)
        ) WITHOUT ROWID;
        CREATE INDEX segment_labels_segment ON segment_labels(segment_id);
        CREATE TRIGGER label_count_add AFTER INSERT ON segment_labels
            BEGIN UPDATE labels SET count = count + 1 WHERE id = NEW.label_id; END;
        CREATE TRIGGER label_count_remove AFTER DELETE ON segment_labels
            BEGIN UPDATE labels SET count = count - 1 WHERE id = OLD.label_id; END;
        """
    )


@migrations()
def m002_fingerprints(db: sqlite_utils.Database) -> None:
    """One fingerprint (spectral peaks, see match.fingerprint) per file; ids never reused, like segments'."""
    db.executescript(
        """
        CREATE TABLE fingerprints (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the id the print lookup index refers to
            file_id INTEGER NOT NULL UNIQUE REFERENCES files(id),
            version INTEGER NOT NULL,              -- match.fingerprint.VERSION that made it
            peaks INTEGER NOT NULL,
            data BLOB NOT NULL
        );
        """
    )


@migrations()
def m003_dupes(db: sqlite_utils.Database) -> None:
    """The whole-library duplicate report's pairwise results (see match.dupes), and what picks a keeper.

    Keyed by fingerprint id: a changed file gets a new fingerprint, so its old pairs are
    recognisably stale; a moved file keeps its fingerprint and its pairs. Derived like the
    lookup index, but costly to redo, so kept; `dupes` writes it without bumping the generation.
    """
    db.executescript(
        """
        ALTER TABLE files ADD COLUMN format TEXT;   -- container as libsndfile names it (WAV, FLAC, MP3) or the extension
        ALTER TABLE files ADD COLUMN subtype TEXT;  -- sample encoding (PCM_16, PCM_24, FLOAT, VORBIS, ...)
        CREATE TABLE dupe_queries (fp_id INTEGER PRIMARY KEY);  -- fingerprints matched against the whole lookup
        CREATE TABLE dupe_pairs (
            fp_a INTEGER NOT NULL, fp_b INTEGER NOT NULL,  -- fp_a < fp_b
            kind TEXT NOT NULL,                            -- whole | contained | partial
            inner INTEGER,                                 -- contained: the fingerprint wholly inside the other
            a_start REAL NOT NULL, a_end REAL NOT NULL, b_start REAL NOT NULL, b_end REAL NOT NULL,
            speed REAL NOT NULL,                           -- a seconds per b second
            pitch REAL NOT NULL,                           -- b frequency / a frequency
            score REAL NOT NULL, inliers INTEGER NOT NULL,
            PRIMARY KEY (fp_a, fp_b)
        ) WITHOUT ROWID;
        CREATE INDEX dupe_pairs_b ON dupe_pairs(fp_b);
        """
    )


@migrations()
def m004_partial_segments(db: sqlite_utils.Database) -> None:
    """Segments of a long file whose run was stopped before the file finished, by the file's content
    hash: the next ingest of the same bytes embeds only the rest. Not searchable (the file is not
    indexed until all its segments are); moved into `segments` when the file is written."""
    db.executescript(
        """
        CREATE TABLE partial_segments (
            hash TEXT NOT NULL,
            start REAL NOT NULL, "end" REAL NOT NULL,
            vector BLOB NOT NULL,                  -- float32 little-endian
            scores BLOB NOT NULL,                  -- float32: stored as a finished file's are when it is
            PRIMARY KEY (hash, start)
        ) WITHOUT ROWID;
        """
    )


@dataclass(frozen=True)
class FileRow:
    id: int
    path: str
    size: int | None
    mtime: float | None
    hash: str | None
    status: str
    error: str | None
    attempts: int


@dataclass(frozen=True)
class PrintRow:
    """A file's fingerprint, serialised (match.fingerprint.Fingerprint.to_bytes)."""

    version: int
    peaks: int
    data: bytes


@dataclass(frozen=True)
class SegmentResult:
    """What the model said about one segment, ready to store."""

    start: float
    end: float
    vector: np.ndarray  # float32 [D]
    scores: np.ndarray  # float32 [labels]


class Store:
    """One index's SQLite database. Open one per thread or process."""

    def __init__(self, index_dir: str | Path, *, create: bool = False, durable: bool | None = None):
        self.dir = Path(index_dir)
        self.durable = durable_from_env() if durable is None else durable
        path = self.dir / DB_NAME
        if self.dir.exists() and not self.dir.is_dir():
            raise IndexNotFound(f"--index {self.dir} is a file; an index is a folder (a new one, or one made by ingest)")
        if not path.exists() and not create:
            raise IndexNotFound(
                f"no index at {self.dir} (run 'audiosearch ingest FOLDER --index {self.dir}' to create one)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        # read-only (folder 555, files 444, a read-only mount): readers still read, writers get one line
        self.read_only = not (os.access(self.dir, os.W_OK) and (not path.exists() or os.access(path, os.W_OK)))
        if self.read_only and create:
            raise IndexWriteError(f"the index at {self.dir} is read-only; ingest needs to write its folder and files")
        conn = _connect_read_only(path) if self.read_only else sqlite3.connect(
            path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        _retry_locked(lambda: self._prepare(create))

    def _prepare(self, create: bool) -> None:
        self.db.execute("PRAGMA busy_timeout=60000")
        if self.read_only:  # it is in WAL mode already; asking for it would write
            return
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        if create:
            self.upgrade()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, *, bump: bool = True) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT that also bumps the generation (unless `bump` is False: a write
        to a table nothing derived reflects, which must not make the FAISS file and lookup stale)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            if bump:
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES ('generation', '1') "
                    "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """Roll back, unless SQLite already did (it does on a full disk): the first error is the one to report."""
        if self.db.conn.in_transaction:
            self.db.execute("ROLLBACK")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every query inside sees one committed state, even while ingest writes."""
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    # -- metadata ---------------------------------------------------------
    def get_meta(self) -> dict[str, str]:
        return {k: v for k, v in self.db.execute("SELECT key, value FROM meta").fetchall()}

    def set_meta(self, values: dict[str, object]) -> None:
        self.db.conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()],
        )

    @property
    def generation(self) -> int:
        return int(self.get_meta().get("generation", 0))

    # -- labels -----------------------------------------------------------
    def ensure_labels(self, id2label: dict[int, str]) -> None:
        self.db.conn.executemany(
            "INSERT OR IGNORE INTO labels(id, name) VALUES (?, ?)", sorted(id2label.items())
        )

    def label_names(self) -> dict[int, str]:
        return dict(self.db.execute("SELECT id, name FROM labels").fetchall())

    def label_counts(self, *, all_labels: bool = False) -> list[tuple[str, int]]:
        """(label, segments carrying it), most common first; `all_labels` adds those no segment carries."""
        where = "" if all_labels else "WHERE count > 0 "
        return self.db.execute(f"SELECT name, count FROM labels {where}ORDER BY count DESC, name").fetchall()

    def label_filter(self, label_ids: Iterable[int]) -> LabelFilter:
        return LabelFilter(self.db, sorted(set(label_ids)))

    # -- files ------------------------------------------------------------
    def files(self, status: str | None = None) -> list[FileRow]:
        sql = "SELECT id, path, size, mtime, hash, status, error, attempts FROM files"
        args: tuple = ()
        if status:
            sql, args = sql + " WHERE status = ?", (status,)
        return [FileRow(*row) for row in self.db.execute(sql + " ORDER BY path", args).fetchall()]

    def file(self, file_id: int) -> FileRow | None:
        row = self.db.execute("SELECT id, path, size, mtime, hash, status, error, attempts FROM files WHERE id = ?",
                              (file_id,)).fetchone()
        return FileRow(*row) if row else None

    def find_files(self, text: str = "", *, label: str | None = None, limit: int = 50) -> list[tuple[int, str, float]]:
        """(id, path, duration) of indexed files whose path holds `text` (any case) and, with `label`,
        that have a segment carrying that label; by path, at most `limit`."""
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = "SELECT id, path, COALESCE(duration, 0) FROM files WHERE status = 'ok' AND path LIKE ? ESCAPE '\\'"
        args: tuple = (like,)
        if label is not None:
            sql += (" AND id IN (SELECT file_id FROM segments JOIN segment_labels ON segment_id = segments.id "
                    "JOIN labels ON labels.id = label_id WHERE labels.name = ?)")
            args += (label,)
        return self.db.execute(sql + " ORDER BY path LIMIT ?", args + (limit,)).fetchall()

    def label_file_counts(self) -> list[tuple[str, int, int]]:
        """(label, files, segments) for each label some segment carries, most files first."""
        return self.db.execute(
            "SELECT name, COUNT(DISTINCT file_id), COUNT(*) FROM segment_labels JOIN labels ON labels.id = label_id "
            "JOIN segments ON segments.id = segment_id GROUP BY label_id ORDER BY 2 DESC, name"
        ).fetchall()

    def write_file(self, row: dict, segments: list[SegmentResult], prints: PrintRow | None = None) -> None:
        """Replace a file's segments and fingerprint and record its status (call inside a transaction)."""
        file_id = self._upsert_file(row)
        self._delete_segments([file_id])
        self.db.execute("DELETE FROM fingerprints WHERE file_id = ?", (file_id,))
        if row.get("hash"):
            self.clear_partials(row["hash"])
        for seg in segments:
            self._insert_segment(file_id, seg)
        if prints is not None:
            self.db.execute(
                "INSERT INTO fingerprints(file_id, version, peaks, data) VALUES (?, ?, ?, ?)",
                (file_id, prints.version, prints.peaks, prints.data),
            )

    def save_partial(self, digest: str, segments: list[SegmentResult]) -> None:
        """Keep finished segments of a file still being embedded (call inside a transaction)."""
        self.db.conn.executemany(
            'INSERT OR REPLACE INTO partial_segments(hash, start, "end", vector, scores) VALUES (?, ?, ?, ?, ?)',
            [(digest, s.start, s.end, np.ascontiguousarray(s.vector, dtype="<f4").tobytes(),
              np.ascontiguousarray(s.scores, dtype="<f4").tobytes()) for s in segments],
        )

    def partial_segments(self, digest: str) -> list[SegmentResult]:
        """The segments `save_partial` kept for this content, in time order."""
        rows = self.db.execute('SELECT start, "end", vector, scores FROM partial_segments WHERE hash = ? '
                               "ORDER BY start", (digest,)).fetchall()
        return [SegmentResult(a, b, np.frombuffer(v, dtype="<f4").copy(), np.frombuffer(c, dtype="<f4").copy())
                for a, b, v, c in rows]

    def partial_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM partial_segments").fetchone()[0]

    def clear_partials(self, digest: str | None = None) -> None:
        """Forget the partial segments of one content hash, or all of them (a run that finished every file)."""
        if digest is None:
            self.db.execute("DELETE FROM partial_segments")
        else:
            self.db.execute("DELETE FROM partial_segments WHERE hash = ?", (digest,))

    def move_file(self, old_path: str, row: dict) -> None:
        """A file with the same content appeared elsewhere: keep its segments, drop what the new path held."""
        self.delete_files([row["path"]])
        self.db.execute(
            "UPDATE files SET path = ?, size = ?, mtime = ?, updated = ? WHERE path = ?",
            (row["path"], row["size"], row["mtime"], time.time(), old_path),
        )

    def touch_file(self, path: str, size: int, mtime: float) -> None:
        self.db.execute("UPDATE files SET size = ?, mtime = ? WHERE path = ?", (size, mtime, path))

    def delete_files(self, paths: list[str]) -> None:
        ids = [r[0] for p in paths for r in self.db.execute("SELECT id FROM files WHERE path = ?", (p,))]
        self._delete_segments(ids)
        self.db.conn.executemany("DELETE FROM fingerprints WHERE file_id = ?", [(i,) for i in ids])
        self.db.conn.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in ids])

    def _upsert_file(self, row: dict) -> int:
        cols = ["path", "size", "mtime", "hash", "duration", "sample_rate", "channels", "format", "subtype", "status",
                "error"]
        values = [row.get(c) for c in cols] + [time.time()]
        self.db.execute(
            f"INSERT INTO files({', '.join(cols)}, attempts, updated) VALUES ({', '.join('?' * len(cols))}, 0, ?) "
            "ON CONFLICT(path) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
            + ", attempts = 0, updated = excluded.updated",
            values,
        )
        return self.db.execute("SELECT id FROM files WHERE path = ?", (row["path"],)).fetchone()[0]

    def _insert_segment(self, file_id: int, seg: SegmentResult) -> None:
        vector = np.ascontiguousarray(seg.vector, dtype="<f4").tobytes()
        scores = np.asarray(seg.scores, dtype="<f2")
        cur = self.db.execute(
            'INSERT INTO segments(file_id, start, "end", vector, scores) VALUES (?, ?, ?, ?, ?)',
            (file_id, seg.start, seg.end, vector, scores.tobytes()),
        )
        self.db.conn.executemany(
            "INSERT INTO segment_labels(label_id, segment_id, score) VALUES (?, ?, ?)",
            [(i, cur.lastrowid, float(seg.scores[i])) for i in top_labels(seg.scores)],
        )

    def _delete_segments(self, file_ids: list[int]) -> None:
        for file_id in file_ids:
            self.db.execute(
                "DELETE FROM segment_labels WHERE segment_id IN (SELECT id FROM segments WHERE file_id = ?)",
                (file_id,),
            )
            self.db.execute("DELETE FROM segments WHERE file_id = ?", (file_id,))

    # -- segments, as a VectorSource for the FAISS index ---------------------
    @property
    def dim(self) -> int:
        return int(self.get_meta().get("dim", 0))

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM segments").fetchone()[0]

    def ids(self) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM segments ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        found = dict(self._select_by_ids("SELECT id, vector FROM segments", ids))
        return self._stack([found[int(i)] for i in ids])

    def iter_vectors(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        last = -1
        while True:
            rows = self.db.execute(
                "SELECT id, vector FROM segments WHERE id > ? ORDER BY id LIMIT ?", (last, batch_size)
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield np.array([r[0] for r in rows], dtype=np.int64), self._stack([r[1] for r in rows])

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        ids = self.ids()
        if len(ids) > n:
            ids = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))
        return self.vectors(ids)

    def _stack(self, blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1).astype(np.float32)

    def _select_by_ids(self, select: str, ids: Iterable[int], column: str = "id") -> list[tuple]:
        payload = json.dumps([int(i) for i in ids])
        return self.db.execute(f"{select} WHERE {column} IN (SELECT value FROM json_each(?))", (payload,)).fetchall()

    # -- segments, for results and export -----------------------------------
    def segment_info(self, ids: Iterable[int]) -> dict[int, tuple[int, str, float, float]]:
        """id -> (file_id, path, start, end)."""
        rows = self._select_by_ids(
            'SELECT segments.id, file_id, path, start, "end" FROM segments JOIN files ON files.id = file_id',
            ids,
            column="segments.id",
        )
        return {r[0]: tuple(r[1:]) for r in rows}

    def file_segments(self, file_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A file's segments: ids, [start, end] rows and vectors, in time order."""
        rows = self.db.execute(
            'SELECT id, start, "end", vector FROM segments WHERE file_id = ? ORDER BY start', (file_id,)
        ).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        ranges = np.array([(r[1], r[2]) for r in rows], dtype=np.float64).reshape(-1, 2)
        return ids, ranges, self._stack([r[3] for r in rows])

    def segment_labels(self, ids: Iterable[int]) -> dict[int, list[tuple[str, float]]]:
        """id -> [(label, score)] best first: the labels a segment is filtered by."""
        payload = json.dumps([int(i) for i in ids])
        out: dict[int, list[tuple[str, float]]] = {}
        for seg, name, score in self.db.execute(
            "SELECT segment_id, name, score FROM segment_labels JOIN labels ON labels.id = label_id "
            "WHERE segment_id IN (SELECT value FROM json_each(?)) ORDER BY segment_id, score DESC",
            (payload,),
        ):
            out.setdefault(seg, []).append((name, score))
        return out

    def iter_segments(self, batch_size: int = 1024) -> Iterator[list[tuple]]:
        """(id, path, start, end, vector bytes, scores bytes) in id order, for export."""
        last = -1
        while True:
            rows = self.db.execute(
                'SELECT segments.id, path, start, "end", vector, scores FROM segments '
                "JOIN files ON files.id = file_id WHERE segments.id > ? ORDER BY segments.id LIMIT ?",
                (last, batch_size),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    def stats(self) -> dict[str, object]:
        files = dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        seconds = self.db.execute("SELECT COALESCE(SUM(duration), 0) FROM files WHERE status = 'ok'").fetchone()[0]
        return {"files": files, "segments": self.count(), "hours": seconds / 3600}

    # -- fingerprints, for the print lookup index -----------------------------
    @property
    def has_prints(self) -> bool:
        """False for an index made before fingerprints, until an ingest upgrades it."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fingerprints'").fetchone() is not None

    def print_ids(self) -> np.ndarray:
        """Ids of the fingerprints of searchable files, ascending."""
        if not self.has_prints:
            return np.zeros(0, dtype=np.int64)
        rows = self.db.execute(
            "SELECT fingerprints.id FROM fingerprints JOIN files ON files.id = file_id "
            "WHERE status = 'ok' ORDER BY fingerprints.id"
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def iter_prints(self, ids: np.ndarray, batch_size: int = 512) -> Iterator[list[tuple[int, int, bytes]]]:
        """(fingerprint id, version, data) for the given ids, in batches."""
        for start in range(0, len(ids), batch_size):
            yield self._select_by_ids("SELECT id, version, data FROM fingerprints", ids[start:start + batch_size])

    def print_files(self, ids: Iterable[int]) -> dict[int, tuple[int, str, float | None]]:
        """fingerprint id -> (file id, path, duration) for searchable files."""
        rows = self._select_by_ids(
            "SELECT fingerprints.id, file_id, path, duration FROM fingerprints JOIN files ON files.id = file_id "
            "AND status = 'ok'", ids, column="fingerprints.id",
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def orphan_prints(self) -> list[int]:
        """Fingerprints whose file row is gone."""
        return self._ids("SELECT id FROM fingerprints WHERE file_id NOT IN (SELECT id FROM files) ORDER BY id")

    def delete_prints(self, ids: list[int]) -> None:
        self.db.execute("DELETE FROM fingerprints WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps([int(i) for i in ids]),))

    def all_print_ids(self) -> np.ndarray:
        """Ids of every stored fingerprint, whatever its file's status."""
        return np.array(self._ids("SELECT id FROM fingerprints ORDER BY id"), dtype=np.int64)

    def unprinted_paths(self) -> set[str]:
        """Searchable files without a fingerprint (indexed before fingerprints existed)."""
        rows = self.db.execute(
            "SELECT path FROM files WHERE status = 'ok' AND id NOT IN (SELECT file_id FROM fingerprints)"
        ).fetchall()
        return {r[0] for r in rows}

    def file_print_counts(self) -> tuple[int, int]:
        """(searchable files, of which fingerprinted)."""
        row = self.db.execute(
            "SELECT COUNT(*), COUNT(fingerprints.id) FROM files LEFT JOIN fingerprints ON file_id = files.id "
            "WHERE status = 'ok'"
        ).fetchone()
        return row[0], row[1]

    # -- the duplicate report's pairwise results (match.dupes) -------------------
    @property
    def has_dupes(self) -> bool:
        """False for an index made before the duplicate report, until `upgrade` (or an ingest) adds its tables."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'dupe_pairs'").fetchone() is not None

    def upgrade(self) -> None:
        """Apply the migrations an index made by an older audiosearch lacks (no data is rewritten); in one
        IMMEDIATE transaction, so two first runs do not both create the schema."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            migrations.apply(self.db)
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def live_prints(self) -> dict[int, int]:
        """fingerprint id -> version, for the fingerprints of searchable files."""
        if not self.has_prints:
            return {}
        return dict(self.db.execute(
            "SELECT fingerprints.id, version FROM fingerprints JOIN files ON files.id = file_id WHERE status = 'ok'"
        ).fetchall())

    def dupe_queries(self) -> set[int]:
        """Fingerprints already matched against the whole lookup."""
        return set(self._ids("SELECT fp_id FROM dupe_queries"))

    def forget_dupes(self, fp_ids: Iterable[int] | None = None) -> None:
        """Drop the pairwise results touching these fingerprints (all of them when None); inside a transaction."""
        if fp_ids is None:
            self.db.execute("DELETE FROM dupe_queries")
            self.db.execute("DELETE FROM dupe_pairs")
            return
        payload = json.dumps([int(i) for i in fp_ids])
        self.db.execute("DELETE FROM dupe_queries WHERE fp_id IN (SELECT value FROM json_each(?))", (payload,))
        self.db.execute("DELETE FROM dupe_pairs WHERE fp_a IN (SELECT value FROM json_each(?)) "
                        "OR fp_b IN (SELECT value FROM json_each(?))", (payload, payload))
        # a pair with a file that was never a query itself (its fingerprint since replaced or deleted)
        self.db.execute("DELETE FROM dupe_pairs WHERE fp_a NOT IN (SELECT id FROM fingerprints) "
                        "OR fp_b NOT IN (SELECT id FROM fingerprints)")

    def save_dupes(self, queried: Iterable[int], pairs: Iterable[tuple]) -> None:
        """Record fingerprints as matched and their pairs (fp_a, fp_b, kind, inner, a_start, a_end, b_start,
        b_end, speed, pitch, score, inliers); a pair found again replaces itself. Inside a transaction."""
        self.db.conn.executemany("INSERT OR IGNORE INTO dupe_queries(fp_id) VALUES (?)", [(int(i),) for i in queried])
        self.db.conn.executemany("INSERT OR REPLACE INTO dupe_pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 list(pairs))

    def dupe_pairs(self) -> list[tuple]:
        """Stored pairs whose two fingerprints are both of searchable files, in fingerprint order."""
        return self.db.execute(
            "SELECT p.* FROM dupe_pairs p "
            "JOIN fingerprints fa ON fa.id = p.fp_a JOIN files a ON a.id = fa.file_id AND a.status = 'ok' "
            "JOIN fingerprints fb ON fb.id = p.fp_b JOIN files b ON b.id = fb.file_id AND b.status = 'ok' "
            "ORDER BY p.fp_a, p.fp_b"
        ).fetchall()

    def print_data(self, ids: Iterable[int]) -> dict[int, bytes]:
        """fingerprint id -> serialised fingerprint."""
        return dict(self._select_by_ids("SELECT id, data FROM fingerprints", ids))

    def print_file_details(self, ids: Iterable[int]) -> dict[int, dict]:
        """fingerprint id -> its file's id, path, duration, sample rate, channels, format and subtype."""
        cols = ["file_id", "path", "duration", "sample_rate", "channels", "format", "subtype"]
        rows = self._select_by_ids(
            f"SELECT fingerprints.id, file_id, path, duration, sample_rate, channels, {self._format_columns()} "
            "FROM fingerprints JOIN files ON files.id = file_id", ids, column="fingerprints.id")
        return {r[0]: dict(zip(cols, r[1:])) for r in rows}

    def file_details(self, file_ids: Iterable[int]) -> dict[int, dict]:
        """file id -> its path, duration, sample rate, channels, format and subtype."""
        cols = ["path", "duration", "sample_rate", "channels", "format", "subtype"]
        rows = self._select_by_ids(f"SELECT id, {', '.join(cols[:4])}, {self._format_columns()} FROM files", file_ids)
        return {r[0]: dict(zip(cols, r[1:])) for r in rows}

    def _format_columns(self) -> str:
        """format and subtype, or NULLs in a (read-only) index made before they were recorded."""
        return "format, subtype" if self.has_dupes else "NULL, NULL"

    def files_with_labels(self, label_ids: Iterable[int]) -> set[int]:
        """Ids of the files with a segment carrying any of these labels."""
        return set(self._ids(
            "SELECT DISTINCT file_id FROM segments JOIN segment_labels ON segment_id = segments.id "
            "WHERE label_id IN (SELECT value FROM json_each(?))", (json.dumps([int(i) for i in label_ids]),)))

    # -- consistency, for `audiosearch doctor` -------------------------------
    def integrity_errors(self) -> list[str]:
        """What PRAGMA integrity_check found; empty when the database is sound."""
        found = [row[0] for row in self.db.execute("PRAGMA integrity_check").fetchall()]
        return [] if found == ["ok"] else found

    def orphan_segments(self) -> list[int]:
        """Segments whose file row is gone."""
        return self._ids("SELECT id FROM segments WHERE file_id NOT IN (SELECT id FROM files) ORDER BY id")

    def unsearchable_segments(self) -> list[int]:
        """Segments of files recorded as failed or skipped, which a search must not return."""
        return self._ids(
            "SELECT segments.id FROM segments JOIN files ON files.id = file_id "
            "WHERE status != 'ok' ORDER BY segments.id"
        )

    def malformed_segments(self) -> list[int]:
        """Segments whose vector is not `dim` float32 values (FAISS cannot take them)."""
        return self._ids("SELECT id FROM segments WHERE length(vector) != ? ORDER BY id", (4 * self.dim,))

    def orphan_label_rows(self) -> int:
        """segment_labels rows that point at no segment or at no label."""
        return self.db.execute(
            "SELECT COUNT(*) FROM segment_labels "
            "WHERE segment_id NOT IN (SELECT id FROM segments) OR label_id NOT IN (SELECT id FROM labels)"
        ).fetchone()[0]

    def miscounted_labels(self) -> list[tuple[str, int, int]]:
        """(label, stored count, actual count) where the two disagree."""
        return self.db.execute(
            "SELECT name, count, actual FROM (SELECT name, count, "
            "(SELECT COUNT(*) FROM segment_labels WHERE label_id = labels.id) AS actual FROM labels) "
            "WHERE count != actual ORDER BY name"
        ).fetchall()

    def empty_files(self) -> list[str]:
        """Files recorded as embedded that have no segments: no search can find them."""
        rows = self.db.execute(
            "SELECT path FROM files WHERE status = 'ok' AND id NOT IN (SELECT file_id FROM segments) ORDER BY path"
        ).fetchall()
        return [row[0] for row in rows]

    def delete_segments(self, ids: list[int]) -> None:
        """Delete segments and their label rows by id (call inside a transaction)."""
        payload = json.dumps([int(i) for i in ids])
        self.db.execute("DELETE FROM segment_labels WHERE segment_id IN (SELECT value FROM json_each(?))", (payload,))
        self.db.execute("DELETE FROM segments WHERE id IN (SELECT value FROM json_each(?))", (payload,))

    def delete_orphan_label_rows(self) -> None:
        self.db.execute(
            "DELETE FROM segment_labels "
            "WHERE segment_id NOT IN (SELECT id FROM segments) OR label_id NOT IN (SELECT id FROM labels)"
        )

    def recount_labels(self) -> None:
        self.db.execute("UPDATE labels SET count = (SELECT COUNT(*) FROM segment_labels WHERE label_id = labels.id)")

    def _ids(self, sql: str, args: tuple = ()) -> list[int]:
        return [row[0] for row in self.db.execute(sql, args).fetchall()]


def durable_from_env() -> bool:
    """AUDIOSEARCH_DURABLE=1 (or `ingest --durable`): every commit synced to disk, so a power loss loses none.

    The default, synchronous=NORMAL in WAL mode, is as safe against a killed process, but a power
    loss or OS crash may roll back the last commits made since the last checkpoint (never corrupt).
    """
    return os.environ.get("AUDIOSEARCH_DURABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Open without writing anything: through the WAL when its files are there, else as an immutable file."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:  # a WAL database with no -shm file, which a read-only folder cannot get
        conn.close()
    return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)


def _retry_locked(step, attempts: int = 8) -> None:
    """Run `step`, retrying when SQLite answers "database is locked" without waiting.

    Switching a new database to WAL while other processes open it can fail at
    once instead of going through the busy handler; a short backoff settles it.
    """
    for attempt in range(attempts):
        try:
            step()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def top_labels(scores: np.ndarray) -> list[int]:
    """Indices of the labels a segment is said to carry: up to TOP_LABELS above LABEL_MIN_SCORE, at least one."""
    order = np.argsort(-scores, kind="stable")[:TOP_LABELS]
    keep = [int(i) for i in order if scores[i] >= LABEL_MIN_SCORE]
    return keep or [int(order[0])]


class LabelFilter:
    """The segments carrying any of the given labels (implements search.Filter)."""

    def __init__(self, db: sqlite_utils.Database, label_ids: list[int]):
        self.db, self.label_ids = db, label_ids
        self._ids: np.ndarray | None = None

    def count(self) -> int:
        if len(self.label_ids) == 1:
            row = self.db.execute("SELECT count FROM labels WHERE id = ?", (self.label_ids[0],)).fetchone()
            return row[0] if row else 0
        return len(self.ids())

    def ids(self) -> np.ndarray:
        if self._ids is None:
            rows = self.db.execute(
                "SELECT DISTINCT segment_id FROM segment_labels WHERE label_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY segment_id",
                (json.dumps(self.label_ids),),
            ).fetchall()
            self._ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return self._ids

    def contains(self, ids: np.ndarray) -> np.ndarray:
        rows = self.db.execute(
            "SELECT DISTINCT segment_id FROM segment_labels WHERE label_id IN (SELECT value FROM json_each(?)) "
            "AND segment_id IN (SELECT value FROM json_each(?))",
            (json.dumps(self.label_ids), json.dumps([int(i) for i in ids])),
        ).fetchall()
        return np.isin(ids, np.array([r[0] for r in rows], dtype=np.int64))
