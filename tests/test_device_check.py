"""benchmarks/device_check.py's CPU dry run: the script a GPU session will run cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import device_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_every_section_and_records_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "device_check.json"
    argv = ["--dry-run", "--out", str(out), "--networks", "resnet50v1", "--sections", "training", "lbfgs", "loader"]
    assert device_check.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["device"] == "cpu"
    assert {k: v["status"] for k, v in record["sections"].items()} == {"training": "ok", "lbfgs": "ok", "loader": "ok"}
    (row,) = record["training"]
    assert row["network"] == "resnet50v1" and row["task_images_per_s"] > 0 and row["train_flops_per_image"] > 0
    assert record["lbfgs"]["function_evals"] > 0 and record["loader"]["fastest_rotation_images_per_s"] == row["task_images_per_s"]
    # A failing section is recorded and the file still holds the finished ones (the results written after each).
    record_before = dict(record)
    device_check.run_section(record, "broken", 5, lambda: 1 / 0, out)
    again = json.loads(out.read_text())
    assert again["sections"]["broken"]["status"] == "failed" and "ZeroDivisionError" in again["sections"]["broken"]["error"]
    assert again["training"] == record_before["training"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
