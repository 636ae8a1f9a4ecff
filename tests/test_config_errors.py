"""Config composition errors are one-line UserErrors: malformed YAML, unknown keys, bad values."""

import sys

import pytest

from salatrain.config.compose import compose_config, expand_sweeps
from salatrain.errors import UserError


def test_malformed_yaml_is_one_line_with_its_position(tmp_path, monkeypatch):
    pkg = tmp_path / "broken_conf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.yaml").write_text("a: 1\nb: [unclosed\nc: 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as e:
        compose_config("mine", [], config_module="broken_conf")
    msg = str(e.value)
    assert "malformed" in msg and "line" in msg and "\n" not in msg
    sys.modules.pop("broken_conf", None)


def test_sweeps_expand_to_every_combination():
    jobs = expand_sweeps(["a=1,2", "b=x,y", "c=3"])
    assert sorted(map(tuple, jobs)) == sorted([("a=1", "b=x", "c=3"), ("a=1", "b=y", "c=3"),
                                               ("a=2", "b=x", "c=3"), ("a=2", "b=y", "c=3")])
    with pytest.raises(UserError, match="cannot parse overrides"):
        expand_sweeps(["a=[1,"])


def test_mixer_defaults_are_declared_once_in_the_hf_config():
    """The convert schema's sparse.* / lightning.* keys are the HF config's default keys, every one unset (null):
    the values live only in SPARSE_DEFAULTS / LIGHTNING_DEFAULTS."""
    import dataclasses

    from salatrain.config.schema import LightningSettings, SparseSettings
    from salatrain.models.configuration_sala_hybrid import LIGHTNING_DEFAULTS, SPARSE_DEFAULTS

    for schema, defaults in ((SparseSettings, SPARSE_DEFAULTS), (LightningSettings, LIGHTNING_DEFAULTS)):
        assert [f.name for f in dataclasses.fields(schema)] == list(defaults)
        assert all(v is None for v in dataclasses.asdict(schema()).values())
