"""The demo end to end at test size: train, probe three representations, write the table and the plot."""

from __future__ import annotations

import json

from PIL import Image

from pretextlab.demo import DemoConfig, run_demo


def test_demo_writes_its_table_curve_and_results(tmp_path):
    config = DemoConfig(
        out=str(tmp_path / "demo"), device="cpu", probe_labels_per_class=30, val_size=200, test_limit=300,
        outputs=("block3", "pre_logits"), training=dict(width=1, limit=400, epochs=0.5, batch_size=32),
    )
    report = run_demo(config, progress=False)
    results = report["results"]
    assert set(results) == {"pretrained", "random_init", "pixels"}
    assert set(results["pretrained"]) == set(results["random_init"]) == {"block3", "pre_logits"}
    for record in [*results["pretrained"].values(), *results["random_init"].values(), results["pixels"]]:
        assert record["train_images"] == 300 and record["test_images"] == 300
        assert 20 < record["test_top1_percent"] <= 100  # ten classes: chance is 10%
    assert results["pixels"]["feature_dim"] == 32 * 32
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert saved["task"] == "rotation" and saved["train_config"]["limit"] == 400
    table = (tmp_path / "demo" / "demo_results.md").read_text()
    assert table.count("| rotation-pretrained") == 2 and "| raw pixels |" in table
    with Image.open(tmp_path / "demo" / "training_curve.png") as image:
        assert image.size[0] > 400
