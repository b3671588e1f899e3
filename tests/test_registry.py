"""The generic registry (pretextlab/registry.py): decorators with metadata, clear errors, a leaf module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretextlab.errors import PretextlabError
from pretextlab.registry import NetworkInfo, Registry, TaskInfo


def test_register_get_metadata_and_names():
    registry: Registry = Registry("network", NetworkInfo)

    @registry.register("tiny", title="Tiny", outputs=("block1", "pre_logits"), default_width=2)
    def tiny(width: int) -> str:
        return f"tiny k={width}"

    @registry.register("other", title="Other", outputs=("pre_logits",), default_width=1, supports_reversible_backward=True)
    def other(width: int) -> str:
        return "other"

    assert registry.get("tiny") is tiny and tiny(3) == "tiny k=3"  # the decorator returns the object unchanged
    assert registry.names() == ("tiny", "other") and "tiny" in registry and len(registry) == 2
    info = registry.metadata("tiny")
    assert info == NetworkInfo("tiny", "Tiny", ("block1", "pre_logits"), 2)
    assert not info.has_final_relu_variant and registry.metadata("other").supports_reversible_backward
    with pytest.raises(Exception):  # frozen: metadata cannot be changed after registration
        info.default_width = 5  # type: ignore[misc]


def test_unknown_name_lists_the_valid_ones_and_duplicates_are_refused():
    registry: Registry = Registry("pretext task", TaskInfo)
    registry.register("rotation", title="Rotation", default_batch_size=256)(object)
    with pytest.raises(PretextlabError, match=r"unknown pretext task 'rotaton': choose one of rotation"):
        registry.get("rotaton")
    with pytest.raises(PretextlabError, match="unknown pretext task"):
        registry.metadata("jigsaw")
    with pytest.raises(PretextlabError, match="registered twice"):
        registry.register("rotation", title="Rotation")(dict)
    with pytest.raises(TypeError, match="bad metadata.*the fields are title, default_batch_size"):
        registry.register("exemplar", titel="Exemplar")


def test_registry_is_a_leaf_that_imports_no_implementation():
    code = (
        "import json, sys; import pretextlab.registry; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('pretextlab', 'torch', 'numpy')))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == ["pretextlab", "pretextlab.errors", "pretextlab.registry"]
