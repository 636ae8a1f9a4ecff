"""Kernel tests: every buffer a kernel is meant to overwrite starts as NaN (salatrain_kernels.utils.POISON, read
when salatrain_kernels.utils is imported; the test modules also switch it on themselves). The Triton
interpreter is switched on for CPU machines in tests/conftest.py."""
import os

os.environ.setdefault("SALATRAIN_KERNELS_POISON", "1")
