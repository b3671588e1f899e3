"""Reading a study never writes it: report, results and `study --dry-run [--cost]` leave a store of
any format byte for byte as it was, with no -wal/-shm beside it, and read what an upgraded copy holds
(store_format.StoreFile's read_only, store_snapshot)."""

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from pretextlab.cli import main
from pretextlab.report.data import StudyData
from pretextlab.study.store import ResultsStore

DATA = Path(__file__).parent / "data"
STUDY = {
    "name": "t",
    "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "test_limit": 100, "epochs": 0.5, "batch_size": 16},
    "grids": [{"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1]}],
    "downstream": {"fm": {"dataset": "fashion-mnist", "limit": 200, "test_limit": 100}},
    "evaluations": [{"outputs": ["pre_logits"], "probes": ["lbfgs"]}],
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(version: int, directory: Path) -> Path:
    directory.mkdir(parents=True)
    path = directory / "results.sqlite"
    shutil.copyfile(DATA / f"store_v{version}.sqlite", path)
    return path


def _loaded(path: Path, **options) -> tuple[StudyData, str]:
    with ResultsStore(path, **options) as store:
        return StudyData.load(store), store.probes_csv()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_reading_an_older_store_changes_nothing_and_reads_what_an_upgrade_holds(tmp_path, capsys, version):
    path = _copy(version, tmp_path / "ro" / "study")
    before = _sha256(path)
    # (immutable: a plain mode=ro connection would itself create -wal/-shm beside this WAL-mode file)
    raw = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(version)
    raw.close()

    assert main(["results", str(path), "--csv", "-"]) == 0
    csv_text = capsys.readouterr().out
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    assert main(["study", str(study_file), "--out", str(path.parent), "--dry-run", "--cost", "--no-progress"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dry_run"] is True and shown["cells"] == 1 and "cost" in shown
    read_only, ro_csv = _loaded(path, read_only=True)

    # The file is as it was, and nothing (no -wal, -shm or journal) was created beside it.
    assert _sha256(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.sqlite"]

    # What was read is what a writer's in-place upgrade of the same file holds.
    upgraded = _copy(version, tmp_path / "rw" / "study")
    with ResultsStore(upgraded):  # a writer: upgrades the file in place
        pass
    assert _sha256(upgraded) != before
    upgraded_data, upgraded_csv = _loaded(upgraded, create=False)
    assert read_only == upgraded_data and read_only.runs
    assert csv_text == ro_csv == upgraded_csv


def test_a_report_of_an_older_store_leaves_it_byte_identical(tmp_path, capsys):
    """`pretextlab report` on a format-1 store (every upgrade step runs, in memory) leaves the file
    byte for byte as it was, with nothing beside it, and reports what the upgrade holds: the main
    table's best / second-best marks and a pending cell, the runs table, a drawn pretext-training
    figure. (The same file upgraded in place: test_store_formats.py.)"""
    path = _copy(1, tmp_path / "study")
    before = _sha256(path)
    assert main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    assert _sha256(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.sqlite"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| resnet50v1 | 2 | <ins>[70.0](#run-a1b2c3d4e5f6)</ins> | **[60.0](#run-b1b2c3d4e5f6)** |" in markdown
    assert "| revnet50(-) | 2 | <ins>**[75.0](#run-c1b2c3d4e5f6)**</ins> | [— (pending)](#run-d1b2c3d4e5f6) |" in markdown
    assert "| a1b2c3d4e5f6 | rotation | resnet50v1 | 2 |  | finished | 91.5 |" in markdown
    training_figure = markdown.split("](pretext_training.png)")[1].split("\n#")[0]
    assert "Missing: nothing has finished" not in training_figure  # drawn, not a placeholder


def test_a_read_only_store_refuses_writes_to_its_private_copy(tmp_path):
    path = _copy(3, tmp_path / "study")
    with ResultsStore(path, read_only=True) as store:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.set_meta("study_name", "changed")
        assert store.get_meta("schema_version") == "4"  # upgraded in the copy
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'study_name'").fetchone()[0] == "legacy-v3"


def test_a_store_being_written_is_read_with_what_its_wal_holds(tmp_path):
    # A running study keeps its -wal: the reader must see the rows that are only there, not the
    # older main file alone (which an immutable read would show).
    path = _copy(3, tmp_path / "study")
    with ResultsStore(path) as writer:
        writer.set_meta("study_name", "in the wal")
        assert (path.parent / "results.sqlite-wal").exists()
        with ResultsStore(path, read_only=True) as reader:
            assert reader.get_meta("study_name") == "in the wal"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes, so a 0444 file in a 0555 directory is still "
                    "writable; the no-write guarantee is pinned above by the byte-identical file and absent -wal/-shm")
def test_a_store_on_a_read_only_file_and_directory_reports(tmp_path, capsys):
    path = _copy(2, tmp_path / "study")
    before = _sha256(path)
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        assert main(["results", str(path), "--csv", "-"]) == 0
        assert len(capsys.readouterr().out.splitlines()) > 1
    finally:
        path.parent.chmod(0o755)
    assert _sha256(path) == before and sorted(p.name for p in path.parent.iterdir()) == ["results.sqlite"]
