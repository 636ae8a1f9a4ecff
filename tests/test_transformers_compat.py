"""The GPU image runs transformers 5.17; this machine the current 5.x. The model must work on both: the cache
argument/output was renamed (past_key_values → cache) and configs became dataclasses between them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / ".cache" / "transformers-5.17"


def test_model_works_on_transformers_5_17():
    if not (OLD / "transformers").is_dir():
        pytest.fail(f"{OLD} missing: run `make setup` (installs transformers 5.17 there for this test)")
    env = dict(os.environ, PYTHONPATH=f"{OLD}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "compat_check.py"), "5.17.0"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compat-ok 5.17.0" in r.stdout
