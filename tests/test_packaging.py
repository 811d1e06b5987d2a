"""Packaging: kernels/ ships only as sparse_attention.kernels, and the wheel carries the default model."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_package(tmp_path):
    code = (
        "import importlib.util, sparse_attention, sparse_attention.kernels as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or not str(spec.origin or '').startswith({str(ROOT)!r}), spec\n"
        f"assert k.__file__.startswith({str(ROOT / 'kernels')!r}) or 'site-packages' in k.__file__, k.__file__\n"
        "from transformers import GPT2LMHeadModel\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_pyproject_maps_kernels_under_the_package():
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["sparse_attention.kernels"] == "kernels"
    assert "kernels" not in setup["packages"]
    # Every package folder of the source tree ships (a forgotten one installs in editable mode but not in a wheel).
    folders = {
        ".".join(("sparse_attention", *p.parent.relative_to(ROOT / "sparse_attention").parts))
        for p in (ROOT / "sparse_attention").rglob("__init__.py")
    }
    folders |= {"sparse_attention.kernels"}
    assert set(setup["packages"]) == folders


def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("sparse_attention-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparse_attention/kernels/__init__.py" in names
    assert "sparse_attention/kernels/config.py" in names
    for module in ("ops/contract.py", "ops/reference.py", "hf/backend.py", "hf/calibration.py", "recipes/data.py"):
        assert f"sparse_attention/{module}" in names, module
    assert not any(n.startswith("kernels/") for n in names)
    assert "sparse_attention/assets/default/config.json" in names
    assert "sparse_attention/assets/default/model.safetensors" in names
    assert "sparse_attention/assets/default/tokenizer.json" in names
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "train_log.json"):
        assert f"sparse_attention/assets/condensed/{name}" in names, name
