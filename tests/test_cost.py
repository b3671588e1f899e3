"""The cost model of a study's grid (study/cost.py, `pretextlab study FILE --dry-run --cost`, docs/scale.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretextlab.cli import main
from pretextlab.data import fashion_mnist
from pretextlab.evaluate.pooling import pool_to_budget
from pretextlab.study import expand_cells, load_study
from pretextlab.study.cost import COST_INPUTS, FEATURE_BYTES, split_sizes
from pretextlab.training.model import build_model

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = ("train_images_seen", "train_gpu_hours", "probe_gpu_hours", "gpu_hours", "checkpoint_bytes", "feature_cache_bytes")


def _cost(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict, str]:
    assert main(["study", *argv, "--dry-run", "--cost"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


@pytest.mark.parametrize("study", ["mini-fashion", "paper-imagenet"])
def test_cost_table_prints_sums_and_creates_nothing(study: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    shown, table = _cost(capsys, str(ROOT / "configs" / f"{study}.yaml"), "--out", str(out))
    cost = shown["cost"]
    assert len(cost["cells"]) == shown["cells"] > 0
    for name in NUMBERS:  # the grid's total is the sum of its cells
        assert cost["total"][name] == pytest.approx(sum(c[name] for c in cost["cells"]), rel=1e-12)
    assert cost["total"]["probe_memory_per_rank_bytes"] == max(c["probe_memory_per_rank_bytes"] for c in cost["cells"])
    assert all(c["gpu_hours"] > 0 and c["checkpoint_bytes"] > 0 and c["feature_cache_bytes"] > 0 for c in cost["cells"])
    assert cost["nodes_for_one_week"] * 8 * 168 >= cost["total"]["gpu_hours"] > (cost["nodes_for_one_week"] - 1) * 8 * 168
    # People read the table on stderr: one row per cell and the total.
    assert table.count("\n| ") == len(cost["cells"]) + 2 and "| **total** |" in table
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_feature_cache_bytes_are_rows_times_pooled_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One mini-fashion cell's cache bytes against the real network's pooled outputs on real images."""
    path = ROOT / "configs" / "mini-fashion.yaml"
    cell = next(c for c in expand_cells(load_study(path)) if c.label == "rotation resnet50v1 k=1")
    network, task = build_model(cell.config)
    arrays = fashion_mnist.read_fashion_mnist(Path("/usr/share/datasets/fashion-mnist"))
    images = fashion_mnist.resize_gray(arrays.test_images[:2], cell.config.decode_size).expand(-1, 3, -1, -1)
    views, _ = task.eval_views(images.contiguous())
    with torch.no_grad():
        dims = {name: pool_to_budget(value).shape[1] for name, value in network.eval()(views).items()}
    # The study file: 4000 images, 400 held out, 2000 test; L-BFGS at three outputs, MLP and SGD
    # (precomputed features: the same pre_logits file), and 10 / 100 labels per class at pre_logits.
    train, val, test, classes, _ = split_sizes("fashion-mnist", None, 4000, 400, 2000, "fashion-mnist")
    assert (train, val, test, classes) == (3600, 400, 2000, 10)
    expected = FEATURE_BYTES * ((train + val + test) * (dims["block2"] + dims["block3"] + dims["pre_logits"])
                                + (10 + 100) * classes * dims["pre_logits"])
    shown, _ = _cost(capsys, str(path), "--out", str(tmp_path / "study"))
    row = next(c for c in shown["cost"]["cells"] if c["cell"] == cell.label)
    assert row["feature_cache_bytes"] == expected


def test_measured_device_figures_replace_the_cited_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "configs" / "mini-fashion.yaml")
    cited, _ = _cost(capsys, path, "--out", str(tmp_path / "study"))
    check = tmp_path / "device_check.json"
    check.write_text(json.dumps({"dry_run": False, "device": "a test GPU",
                                 "training": [{"network": "resnet50v1", "width": 1, "compile": False, "task_flops_per_s": 1e9}]}))
    measured, _ = _cost(capsys, path, "--out", str(tmp_path / "study"), "--device-check", str(check))
    inputs = json.loads(COST_INPUTS.read_text())
    for before, after in zip(cited["cost"]["cells"], measured["cost"]["cells"]):
        if before["cell"] in ("rotation resnet50v1 k=1", "exemplar resnet50v1 k=1"):
            config = next(c.config for c in expand_cells(load_study(path)) if c.label == before["cell"])
            from pretextlab.study.cost import workload_key

            flops = inputs["workloads"][workload_key(config)]["train_flops_per_image"]
            assert after["train_gpu_hours"] == pytest.approx(after["train_images_seen"] * flops / 1e9 / 3600, rel=1e-12)
            assert after["throughput"] == "measured: a test GPU"
        else:
            assert after == before


def test_cost_needs_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    assert main(["study", str(ROOT / "configs" / "mini-fashion.yaml"), "--out", str(out), "--cost"]) == 2
    assert "--cost" in capsys.readouterr().err and not out.exists()


def test_missing_cost_inputs_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["study", str(ROOT / "configs" / "mini-fashion.yaml"), "--out", str(tmp_path / "s"), "--dry-run", "--cost",
            "--cost-inputs", str(tmp_path / "none.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pretextlab: error: no cost inputs at" in err and "bench_cost_inputs.py" in err


@pytest.mark.parametrize(("rows", "dim", "ranks"), [(40, 96, 1), (120, 96, 1), (40, 96, 2)])
def test_few_row_probes_are_priced_as_the_whitening_the_probe_does(rows: int, dim: int, ranks: int) -> None:
    """In one process with fewer rows than features the probe whitens from the N x N side (a thin
    SVD: its eigenvectors are D x rank, not D x D), and the cost model prices that, not the D x D
    eigendecomposition; sharded or with more rows than features, the D x D one in both."""
    from pretextlab.evaluate.lbfgs import Whitening
    from pretextlab.study.cost import lbfgs_flops, lbfgs_memory_per_rank, whitens_from_rows

    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    thin = Whitening.of(features).eigenvectors.shape[1] < dim  # what the probe does in one process
    assert whitens_from_rows(rows, dim, ranks) == (thin and ranks == 1)
    # At a wide layer's few-label probe (1,000 rows, 32,768 features) the two counts are far apart.
    assert lbfgs_flops(1000, 0, 32768, 10, 1, 0.0, ranks=1) < lbfgs_flops(1000, 0, 32768, 10, 1, 0.0, ranks=2) / 100
    assert lbfgs_memory_per_rank(1000, 32768, 10, ranks=1) < lbfgs_memory_per_rank(1000, 32768, 10, ranks=2) / 10
