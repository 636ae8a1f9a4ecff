"""Shared by the kernel benchmarks (imported with bench/ on sys.path)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys


def ensure_kernels_package():
    """Import salatrain_kernels; in a checkout without the installed mapping, serve kernels/ under that name."""
    try:
        import salatrain_kernels  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "salatrain_kernels":
            raise
        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location("salatrain_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["salatrain_kernels"] = mod
        spec.loader.exec_module(mod)
