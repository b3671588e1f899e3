"""The results store's file format: its SQLite schema, the format version it records, upgrades from
older formats, and how an unreadable file is recognised and reported."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from pretextlab import __version__
from pretextlab.atomic import fsync_directory
from pretextlab.errors import PretextlabError
from pretextlab.study.store_snapshot import snapshot

STORE_FILE = "results.sqlite"
BUSY_TIMEOUT_MS = 120_000

SCHEMA_VERSION = 4
# Formats this version can open: 1 to 3 are upgraded (migrate_1_to_2, migrate_2_to_3, migrate_3_to_4),
# in place by a writer, in a private in-memory copy by a reader.
READABLE_VERSIONS = (1, 2, 3, 4)
# A probe config's fields that change how fast, not what, it computes: left out of its recipe id.
# The same fields as evaluate.probe_run.NOT_IN_RECIPE (a test pins it); named here so the store
# needs no evaluation code (nor torch) to read or upgrade a file.
NOT_IN_PROBE_RECIPE = ("device", "resident")


def probe_recipe_id(probe_config: Mapping[str, Any] | None) -> str | None:
    """A short hash of a probe's resolved config (``EvalConfig.probe_config()`` as a dict, which
    evaluate stores in every record as ``probe_config``): two results with the same id came from the
    same probe recipe. None when the config is unknown (records written before it was stored)."""
    if not isinstance(probe_config, Mapping):
        return None
    recipe = {k: v for k, v in probe_config.items() if k not in NOT_IN_PROBE_RECIPE}
    # JSON turns tuples into lists, so a config and its stored record give the same text.
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


# A probe result's columns, the same in probes (the current results, with an id) and
# superseded_probes (results of a recipe the study no longer asks for: kept, never current).
_RESULT_COLUMN_DEFS = """
    config_hash TEXT NOT NULL REFERENCES runs(config_hash),
    dataset TEXT NOT NULL,
    output TEXT NOT NULL,
    probe TEXT NOT NULL,
    labels TEXT NOT NULL,
    val_top1_percent REAL,
    test_top1_percent REAL,
    chosen_json TEXT,
    feature_dim INTEGER,
    train_images INTEGER,
    seconds REAL,
    record_json TEXT NOT NULL,
    created REAL NOT NULL,
    recipe TEXT"""
# Their names in that order, for moving a row from one table to the other.
RESULT_COLUMNS = ", ".join(line.split()[0] for line in _RESULT_COLUMN_DEFS.strip().splitlines())
SUPERSEDED_TABLE = f"""
CREATE TABLE IF NOT EXISTS superseded_probes ({_RESULT_COLUMN_DEFS},
    superseded REAL NOT NULL,
    UNIQUE (config_hash, dataset, output, probe, labels, recipe)
);
"""
# Who ran a cell (its latest attempt) and each attempt: ranks in the job (1 for an inline or
# single-task cell), nodes they ran on, and those hosts (comma-separated).
RANK_COLUMNS = ("ranks INTEGER", "nodes INTEGER", "hosts TEXT")
_RANK_SQL = "".join(f",\n    {column}" for column in RANK_COLUMNS)
KEY_SQL = "config_hash = ? AND dataset = ? AND output = ? AND probe = ? AND labels = ?"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    network TEXT NOT NULL,
    width INTEGER,
    representation_size INTEGER,
    config_json TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    in_study INTEGER NOT NULL DEFAULT 1,
    owner TEXT,
    heartbeat REAL,
    pretext_val_accuracy_percent REAL,
    steps INTEGER,
    train_seconds REAL,
    probe_seconds REAL,
    summary_json TEXT,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    trained REAL,
    finished REAL""" + _RANK_SQL + """
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_hash TEXT NOT NULL REFERENCES runs(config_hash),
    owner TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT,
    start_step INTEGER""" + _RANK_SQL + """
);
CREATE TABLE IF NOT EXISTS plan (
    config_hash TEXT NOT NULL REFERENCES runs(config_hash),
    dataset TEXT NOT NULL,
    output TEXT NOT NULL,
    probe TEXT NOT NULL,
    labels TEXT NOT NULL,
    recipe TEXT,
    UNIQUE (config_hash, dataset, output, probe, labels)
);
CREATE TABLE IF NOT EXISTS probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,""" + _RESULT_COLUMN_DEFS + """,
    UNIQUE (config_hash, dataset, output, probe, labels)
);
CREATE TABLE IF NOT EXISTS curves (
    config_hash TEXT NOT NULL REFERENCES runs(config_hash),
    step INTEGER NOT NULL,
    epoch REAL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    UNIQUE (config_hash, step, name)
);
""" + SUPERSEDED_TABLE


def unreadable(path: Path, reason: str) -> PretextlabError:
    return PretextlabError(
        f"{path} is not a readable results store ({reason}); it was left as it is: move it aside "
        "(or restore it from a backup) and run `pretextlab study FILE` again, which re-registers every "
        "cell and reuses finished pretext runs from their run directories"
    )


def is_corruption(error: sqlite3.DatabaseError) -> bool:
    """SQLite's words for a file that is not (or no longer) a database; lock timeouts are not."""
    text = str(error).lower()
    return any(words in text for words in ("malformed", "not a database", "file is encrypted", "disk i/o error"))


def migrate_1_to_2(db: "Transaction") -> None:
    """Format 1 -> 2, inside the opening transaction (all or nothing): probe accuracies were
    fractions in val_top1 / test_top1; the pretext accuracy was already percent."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)").fetchall()}
    # The earliest format-1 stores predate runs.in_study (every cell then counted as in the study).
    if "in_study" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN in_study INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE runs RENAME COLUMN pretext_val_accuracy TO pretext_val_accuracy_percent")
    db.execute("ALTER TABLE probes RENAME COLUMN val_top1 TO val_top1_percent")
    db.execute("ALTER TABLE probes RENAME COLUMN test_top1 TO test_top1_percent")
    # Rounded to 10 decimals so 0.5625 becomes 56.25, not 56.249999999999986 (accuracies are ratios of counts).
    db.execute("UPDATE probes SET val_top1_percent = ROUND(100 * val_top1_percent, 10), test_top1_percent = ROUND(100 * test_top1_percent, 10)")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('migrated_from', '1')")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('written_by', ?)", (f"pretextlab {__version__}",))


def migrate_2_to_3(db: "Transaction") -> None:
    """Format 2 -> 3, inside the opening transaction: planned probes and results gain the probe
    recipe's id, and superseded results a table of their own. A stored result's id comes from the
    ``probe_config`` its record holds; a record without one (format 1 kept none) gets NULL, an
    unknown recipe, which a planned probe with a known recipe never counts as done."""
    db.execute("ALTER TABLE plan ADD COLUMN recipe TEXT")
    db.execute("ALTER TABLE probes ADD COLUMN recipe TEXT")
    db.executescript_safe(SUPERSEDED_TABLE)
    rows = db.execute("SELECT id, record_json FROM probes").fetchall()
    db.executemany(
        "UPDATE probes SET recipe = ? WHERE id = ?",
        [(probe_recipe_id(json.loads(record).get("probe_config")), row_id) for row_id, record in rows],
    )
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('migrated_from', '2')")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('written_by', ?)", (f"pretextlab {__version__}",))


def migrate_3_to_4(db: "Transaction") -> None:
    """Format 3 -> 4, inside the opening transaction: cells and attempts say how many ranks on how
    many nodes (and which hosts) ran them. An older cell's ranks come from its summary's
    ``world_size`` when it trained (torchrun runs recorded it); nodes and hosts stay unknown (NULL)."""
    for table in ("runs", "attempts"):
        for column in RANK_COLUMNS:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    rows = db.execute("SELECT config_hash, summary_json FROM runs WHERE summary_json IS NOT NULL").fetchall()
    db.executemany(
        "UPDATE runs SET ranks = ? WHERE config_hash = ?",
        [(json.loads(summary).get("world_size", 1), config_hash) for config_hash, summary in rows],
    )
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('migrated_from', '3')")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('written_by', ?)", (f"pretextlab {__version__}",))


def make_current(db: "Transaction", key: Sequence[str], recipe: str | None) -> None:
    """The current result of ``key`` (config_hash, dataset, output, probe, labels) becomes the one
    of ``recipe``: another recipe's is moved to superseded_probes, and a superseded one of
    ``recipe`` comes back (none if there is none)."""
    current = db.execute(f"SELECT recipe FROM probes WHERE {KEY_SQL}", key).fetchone()
    if current is None or current[0] != recipe:
        if current is not None:
            db.execute(f"INSERT OR REPLACE INTO superseded_probes ({RESULT_COLUMNS}, superseded) "
                       f"SELECT {RESULT_COLUMNS}, ? FROM probes WHERE {KEY_SQL}", (time.time(), *key))
            db.execute(f"DELETE FROM probes WHERE {KEY_SQL}", key)
        kept = f"FROM superseded_probes WHERE {KEY_SQL} AND recipe = ?"
        db.execute(f"INSERT INTO probes ({RESULT_COLUMNS}) SELECT {RESULT_COLUMNS} {kept}", (*key, recipe))
        db.execute(f"DELETE {kept}", (*key, recipe))


class Transaction:
    """The connection inside one BEGIN IMMEDIATE block (executescript would commit it, so split)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.connection.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self.connection.executemany(sql, rows)

    def executescript_safe(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self.connection.execute(statement)


class StoreFile:
    """An open store file: checked, at the current format, with transactions and the meta table.

    ``read_only``: a command that only reads (report, results, a dry run) never changes the file,
    nor creates anything beside it, so reading cannot damage a store, upgrade a committed one behind
    its owner's back, or fail on a read-only file system. It reads a private in-memory copy
    (store_snapshot), upgraded there when it is of an older format, and refuses every write."""

    def __init__(self, path: str | os.PathLike, create: bool = True, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        existed = self.path.exists()
        if (read_only or not create) and not existed:
            raise PretextlabError(f"no results store at {self.path}: run `pretextlab study FILE` first")
        if existed and self.path.is_dir():
            raise PretextlabError(f"{self.path} is a directory, not a results store: pass the study directory or its {STORE_FILE}")
        # A zero-byte file would silently become an empty store: it is more likely a store whose
        # contents were lost (a failed copy, a full disk), so say so instead of hiding it.
        if existed and self.path.stat().st_size == 0:
            raise unreadable(self.path, "the file is empty (0 bytes)")
        if not existed and not read_only:
            self._create_whole()
            existed = True
        if read_only:
            with self._translate_errors():
                self.connection = snapshot(self.path)
        else:
            # isolation_level=None: autocommit, transactions are explicit BEGIN IMMEDIATE blocks below,
            # so a writer takes the lock before reading what it will change.
            self.connection = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self.connection.row_factory = sqlite3.Row
        try:
            self._open(existed)
        except BaseException:
            self.connection.close()
            raise

    def _create_whole(self) -> None:
        """Made whole beside its path, then linked in: no reader meets it before its schema (read as empty)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = self.path.with_name(f".{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.new")
        try:
            with self._translate_errors():
                self.connection = sqlite3.connect(str(fresh), isolation_level=None)
                try:
                    self.connection.execute("PRAGMA journal_mode = WAL")  # recorded in the file's header
                    self._prepare()
                finally:
                    self.connection.close()  # the last connection: SQLite folds the WAL into the file
            with open(fresh, "rb") as handle:
                os.fsync(handle.fileno())
            with suppress(FileExistsError):
                os.link(fresh, self.path)  # unlike a rename, never replaces a store made meanwhile
            fsync_directory(self.path.parent)
        finally:
            fresh.unlink(missing_ok=True)

    def _open(self, existed: bool) -> None:
        with self._translate_errors():
            if existed:
                # Before anything writes (even the WAL switch), check the file is a sound database.
                problems = [row[0] for row in self.connection.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise unreadable(self.path, f"SQLite's integrity check says: {problems[0]}")
                # Someone else's database or an unknown format is refused before the WAL switch,
                # which would rewrite its header.
                tables = {r[0] for r in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
                if tables:
                    self._version(self.connection, tables)
            if not self.read_only:
                self.connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                mode = self.connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise PretextlabError(f"{self.path} cannot use SQLite's WAL mode (got {mode!r}): put the study on a local or POSIX file system")
                self.connection.execute("PRAGMA synchronous = NORMAL")
            self.connection.execute("PRAGMA foreign_keys = ON")
            self._prepare()
            if self.read_only:
                # The copy is private: a write to it would vanish on close, so refuse it loudly.
                self.connection.execute("PRAGMA query_only = ON")

    def _prepare(self) -> None:
        """An empty file gets the schema; an older format is upgraded (in the copy when read-only)."""
        with self.transaction() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
            if not tables:
                db.executescript_safe(_SCHEMA)
                db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('written_by', ?)", (f"pretextlab {__version__}",))
                return
            version = self._version(db, tables)
            # Each step in turn, all in this one transaction: a failed upgrade leaves format 1 or 2.
            if version == 1:
                migrate_1_to_2(db)
            if version <= 2:
                migrate_2_to_3(db)
            if version <= 3:
                migrate_3_to_4(db)

    def _version(self, db: "Transaction | sqlite3.Connection", tables: set[str]) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if "meta" in tables else None
        if row is None:
            raise unreadable(self.path, "it has no pretextlab format version: it is some other SQLite database")
        version = int(row[0]) if str(row[0]).isdigit() else None
        if version not in READABLE_VERSIONS:
            raise PretextlabError(
                f"{self.path} is a results store of format {row[0]}, which pretextlab {__version__} cannot read "
                f"(it reads formats {', '.join(map(str, READABLE_VERSIONS))}): report it with the pretextlab version "
                "that wrote it, or start a new study directory (`pretextlab study FILE --out NEW_DIR`)"
            )
        return version

    # -- plumbing --------------------------------------------------------------------------------

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "StoreFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """A store that turns out to be damaged mid-way gives the one-line error, not a traceback."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            if is_corruption(error):
                raise unreadable(self.path, f"SQLite says: {error}") from error
            raise

    @contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """BEGIN IMMEDIATE ... COMMIT, retried while another process holds the write lock."""
        with self._translate_errors():
            deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            while True:
                try:
                    self.connection.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as error:
                    if "locked" not in str(error) and "busy" not in str(error) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            try:
                yield Transaction(self.connection)
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._translate_errors():
            return [dict(row) for row in self.connection.execute(sql, params).fetchall()]

    # -- meta ---------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None
