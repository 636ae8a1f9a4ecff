"""Assertions and fixtures several test modules share (import the fixtures into a module to use them there)."""

from __future__ import annotations

import pytest
import torch


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The command failed with exit status 2 and one `salatrain ...` line on stderr holding every needle."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("salatrain "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for the module's tests (its training runs are compared step by step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """A datasets cache shared by the module's training runs."""
    return tmp_path_factory.mktemp("datasets-cache")
