"""Build tests/data/store_v1.sqlite with the store code as of commit 6149cfc (schema version 1)."""
import sys
from pathlib import Path
from pretextlab.store import ResultsStore, SCHEMA_VERSION
assert SCHEMA_VERSION == 1
path = Path(sys.argv[1])
path.unlink(missing_ok=True)
runs = [
    ("a1b2c3d4e5f6", "rotation", "resnet50v1", 2, 0.70, 91.5),
    ("b1b2c3d4e5f6", "exemplar", "resnet50v1", 2, 0.60, 55.25),
    ("c1b2c3d4e5f6", "rotation", "revnet50(-)", 2, 0.75, 93.0),
    ("d1b2c3d4e5f6", "exemplar", "revnet50(-)", 2, None, None),
]
with ResultsStore(path) as store:
    store.set_meta("study_name", "legacy-v1")
    store.set_meta("task_order", "rotation,exemplar")
    store.set_meta("network_order", "resnet50v1,revnet50(-)")
    store.set_meta("dataset_order", "fm")
    for h, task, network, width, acc, pretext in runs:
        plan = [("fm", o, "lbfgs", "all") for o in ("block3", "pre_logits")]
        store.register_run(h, task=task, network=network, width=width, representation_size=None,
                           config={"task": task, "network": network.replace("(-)", ""), "width": width},
                           run_dir=f"/runs/{h}", plan=plan)
        if acc is None:
            continue
        attempt = store.claim(h, "legacy:1")
        store.record_training(h, {"val_pretext_accuracy": pretext, "steps": 20, "config_hash": h}, 4.0)
        store.add_curve_points(h, [{"step": 10, "epoch": 1.0, "pretext_accuracy": pretext - 5, "val_pretext_accuracy": pretext - 3},
                                   {"step": 20, "epoch": 2.0, "pretext_accuracy": pretext - 1, "val_pretext_accuracy": pretext}])
        for output, drop in (("block3", 0.05), ("pre_logits", 0.0)):
            store.add_probe_result(h, "fm", {"output": output, "probe": "lbfgs", "labels": "all", "val_top1": acc - drop + 0.0125,
                                             "test_top1": acc - drop, "chosen": {"l2": 0.001}, "feature_dim": 512,
                                             "train_images": 1000, "seconds": 2.0})
        store.add_probe_seconds(h, 2.0)
        store.end_attempt(h, attempt, "finished")
print(path.stat().st_size)
