"""A store that is damaged, empty, someone else's or of an unknown format is refused with one
`pretextlab: error:` line naming the file and what to do, and is left byte for byte as it was; a
store written by the first release (format 1, tests/data/store_v1.sqlite) still loads and lists its
results (and reports: tests/test_store_readonly.py)."""

import shutil
import sqlite3
from pathlib import Path

import pytest

from pretextlab.cli import main
from pretextlab.errors import PretextlabError
from pretextlab.study.store import ResultsStore
from pretextlab.study.store_format import SCHEMA_VERSION

V1_STORE = Path(__file__).parent / "data" / "store_v1.sqlite"


def _filled_store(path: Path, rows: int = 300) -> None:
    with ResultsStore(path) as store:
        store.register_run("aaaa00000001", task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={"task": "rotation"}, run_dir="/runs/a", plan=[("fm", "pre_logits", "lbfgs", "all")])
        for i in range(rows):  # enough rows for the probes table to span many pages
            store.add_probe_result("aaaa00000001", "fm", {"output": f"out{i}", "probe": "lbfgs", "labels": "all",
                                                          "val_top1_percent": 50.0, "test_top1_percent": 40.0,
                                                          "padding": "x" * 200})


def _malformed(path: Path) -> None:
    _filled_store(path)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    # Keep the header page (so SQLite opens it) and overwrite the pages after it with noise.
    for offset in range(page, len(data) - page, 2 * page):
        data[offset : offset + page] = bytes((i * 37 + 11) % 256 for i in range(page))
    path.write_bytes(bytes(data))


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database, it is a text file someone copied here\n" * 100)


def _other_database(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE songs (title TEXT)")
    connection.commit()
    connection.close()


@pytest.mark.parametrize("damage, reason", [
    (_malformed, "SQLite"),
    (_zero_bytes, "empty (0 bytes)"),
    (_garbage, "not a database"),
    (_other_database, "no pretextlab format version"),
])
def test_a_damaged_store_is_one_clear_error_and_is_left_untouched(tmp_path, capsys, damage, reason):
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    path = study_dir / "results.sqlite"
    damage(path)
    before = path.read_bytes()
    for command in (["results", str(study_dir)], ["results", str(path), "--csv", "-"],
                    ["report", str(study_dir), "--out", str(tmp_path / "report")]):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pretextlab: error: "), captured.err
        assert str(path) in lines[0] and reason in lines[0] and "move it aside" in lines[0], lines[0]
        assert "Traceback" not in captured.err and captured.out == ""
    # Opening it to write (a study starting) is refused the same way; nothing was changed or added.
    with pytest.raises(PretextlabError, match="not a readable results store"):
        ResultsStore(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in study_dir.iterdir()) == ["results.sqlite"]
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())


def test_a_format_1_store_is_upgraded_in_place_and_lists_its_results(tmp_path, capsys):
    path = tmp_path / "results.sqlite"
    shutil.copyfile(V1_STORE, path)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    assert raw.execute("SELECT test_top1 FROM probes WHERE output = 'pre_logits' ORDER BY test_top1").fetchall() == [(0.6,), (0.7,), (0.75,)]
    raw.close()

    assert main(["results", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "pre_logits  lbfgs  all       71.25  70.00  L2=1e-03" in listed
    with ResultsStore(path, create=False) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION) and store.get_meta("migrated_from") == "1"
        probes = {(p["config_hash"], p["output"]): p for p in store.probes()}
        runs = {r["config_hash"]: r for r in store.runs()}
    assert probes[("a1b2c3d4e5f6", "pre_logits")]["test_top1_percent"] == pytest.approx(70.0, abs=1e-9)
    assert probes[("a1b2c3d4e5f6", "block3")]["test_top1_percent"] == pytest.approx(65.0, abs=1e-9)
    assert runs["a1b2c3d4e5f6"]["pretext_val_accuracy_percent"] == 91.5  # was already percent: unchanged
    # Fractions become percent without binary noise: 0.5625 is 56.25 in the CSV, not 56.249999999999986.
    assert main(["results", str(path), "--csv", "-"]) == 0
    assert ",fm,block3,lbfgs,all,56.25,55.0,0.001," in capsys.readouterr().out
    assert runs["d1b2c3d4e5f6"]["status"] == "pending" and runs["d1b2c3d4e5f6"]["in_study"] == 1
    # Its report (the same upgrade, of the format-1 file itself, in memory) is checked table by
    # table in test_store_readonly.py's test_a_report_of_an_older_store_leaves_it_byte_identical.


def test_a_store_of_an_unknown_format_is_refused_naming_its_version(tmp_path, capsys):
    path = tmp_path / "results.sqlite"
    shutil.copyfile(V1_STORE, path)
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    raw.commit()
    raw.close()
    before = path.read_bytes()
    assert main(["report", str(path), "--out", str(tmp_path / "report")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pretextlab: error: {path} is a results store of format 7"), lines
    assert "reads formats 1, 2" in lines[0] and "start a new study directory" in lines[0]
    assert path.read_bytes() == before


def test_a_new_store_is_absent_or_whole_to_a_reader_never_half_made(tmp_path, monkeypatch):
    """A store being created is made whole beside its path and linked in: a reader that opens the path
    while the schema is being written (a report, `study --status`, a poller) is told there is no
    store yet. Before, SQLite's file sat at the path from its first byte, and such a reader was told
    the store was empty (0 bytes) or saw one without tables. Nothing is left beside it."""
    from pretextlab.study.store_format import StoreFile

    path = tmp_path / "study" / "results.sqlite"
    seen: list[str] = []
    write_schema = StoreFile._prepare

    def look_while_writing(self):
        if not seen and not self.read_only:  # once, from the creator, while it writes the schema
            try:
                with ResultsStore(path, read_only=True):
                    seen.append("opened a store")
            except PretextlabError as error:
                seen.append(str(error))
        return write_schema(self)

    monkeypatch.setattr(StoreFile, "_prepare", look_while_writing)
    with ResultsStore(path) as store:
        assert store.runs() == []
    assert len(seen) == 1 and seen[0].startswith(f"no results store at {path}"), seen
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.sqlite"]
    with ResultsStore(path, read_only=True) as reader:
        assert reader.runs() == []
