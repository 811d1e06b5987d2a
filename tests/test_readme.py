"""The README's usage example runs as written (on the shipped default model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(tmp_path, monkeypatch):
    from sparse_attention import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail("the shipped default model is missing from the package data")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # The example uses only the public API: no import of a private or internal module.
    assert not re.search(r"from sparse_attention\.|import sparse_attention\.", blocks[0])
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert 0.0 < namespace["stats"].kept_fraction(include_dense=False) < 1.0
    assert (tmp_path / "my-top-theta-model" / "config.json").is_file()
