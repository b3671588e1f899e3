"""Build tests/data/store_v2.sqlite with the store code as of commit b8f8e5c (format 2: accuracies in
percent, no probe recipe identity). Its probe records carry ``probe_config`` as evaluate_run wrote it
then: L-BFGS with its default grid, and an SGD linear probe (precomputed, paper schedule, 2 epochs)."""
import dataclasses
import sys
from pathlib import Path

from pretextlab.evaluate.probe_run import EvalConfig
from pretextlab.study.store import ResultsStore
from pretextlab.study.store_format import SCHEMA_VERSION

assert SCHEMA_VERSION == 2
path = Path(sys.argv[1])
path.unlink(missing_ok=True)
configs = {
    "lbfgs": EvalConfig(probe="lbfgs", dataset="fashion-mnist"),
    "sgd": EvalConfig(probe="sgd", dataset="fashion-mnist", sgd_epochs=2),
}
with ResultsStore(path) as store:
    store.set_meta("study_name", "legacy-v2")
    plan = [("fm", "pre_logits", probe, "all") for probe in configs]
    store.register_run("a1b2c3d4e5f6", task="rotation", network="resnet50v1", width=1, representation_size=None,
                       config={"task": "rotation", "network": "resnet50v1", "width": 1}, run_dir="/runs/a1b2c3d4e5f6",
                       plan=plan)
    attempt = store.claim("a1b2c3d4e5f6", "legacy:2")
    store.record_training("a1b2c3d4e5f6", {"val_pretext_accuracy_percent": 80.0, "steps": 10}, 3.0)
    for (probe, config), test in zip(configs.items(), (62.5, 55.0)):
        store.add_probe_result("a1b2c3d4e5f6", "fm", {
            "output": "pre_logits", "probe": probe, "labels": "all", "val_top1_percent": test + 1.25,
            "test_top1_percent": test, "chosen": {"l2": 0.001} if probe == "lbfgs" else {"epoch": 2},
            "probe_config": dataclasses.asdict(config.probe_config()), "feature_dim": 64, "train_images": 160})
    store.end_attempt("a1b2c3d4e5f6", attempt, "finished")
print(path.stat().st_size)
