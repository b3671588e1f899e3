"""Build tests/data/store_v3.sqlite with the store code as of commit 6b49db2 (format 3: probe recipe
ids, no ranks or nodes): one cell trained by 2 torchrun ranks (its summary's world_size) and one
never trained. Run with that commit's src on PYTHONPATH (git archive 6b49db2 src | tar -x -C DIR)."""
import sys
from pathlib import Path

from pretextlab.study.store import ResultsStore
from pretextlab.study.store_format import SCHEMA_VERSION

assert SCHEMA_VERSION == 3
path = Path(sys.argv[1])
path.unlink(missing_ok=True)
with ResultsStore(path) as store:
    store.set_meta("study_name", "legacy-v3")
    for config_hash in ("a1b2c3d4e5f6", "0f0e0d0c0b0a"):
        store.register_run(config_hash, task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={"task": "rotation", "network": "resnet50v1", "width": 1}, run_dir=f"/runs/{config_hash}",
                           plan=[("fm", "pre_logits", "lbfgs", "all")])
    attempt = store.claim("a1b2c3d4e5f6", "legacy:3")
    store.record_training("a1b2c3d4e5f6", {"val_pretext_accuracy_percent": 80.0, "steps": 10, "world_size": 2}, 3.0)
    store.end_attempt("a1b2c3d4e5f6", attempt, "interrupted", error="stopped")
print(path.stat().st_size)
