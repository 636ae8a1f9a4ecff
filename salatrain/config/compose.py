"""Compose a command's typed config from its schema, an optional recipe and ``key=value`` overrides (Hydra).

Hydra's compose API is used (no ``@hydra.main``): nothing is written outside ``output_dir``, no ``outputs/``
folders, no logging reconfiguration. Mistakes become one-line ``UserError`` messages; an unknown or misspelt
key names the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError
from .ranges import check_ranges
from .store import register

CONFIG_MODULE = "salatrain.conf"
_KEY_RE = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.\-/@]*)(?==|$)")


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a config node (leaves and intermediate nodes)."""
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            key = f"{prefix}{k}"
            out.append(key)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not child._is_none():
                out.extend(flat_keys(child, key + "."))
    return out


def override_key(override: str) -> str | None:
    m = _KEY_RE.match(override.strip())
    return m.group(1) if m else None


def closest(key: str, valid: list[str]) -> str | None:
    hits = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    leaf = key.rsplit(".", 1)[-1]
    hits = difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1, cutoff=0.6)
    return next((v for v in valid if v.rsplit(".", 1)[-1] == hits[0]), None) if hits else None


def pick_recipe(overrides: list[str], available: list[str], unknown: str, listing: str) -> str:
    """The ``recipe=<name>`` of the overrides, which must be one of ``available``; one-line errors otherwise
    (``unknown``: "unknown <what>", ``listing``: what the list of names is called)."""
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
    if recipe is None:
        raise UserError(f"missing recipe=<name>; {listing}: {', '.join(available)}")
    if recipe not in available:
        hint = closest(recipe, available)
        raise UserError(f"unknown {unknown} {recipe!r}" + (f"; did you mean {hint!r}?" if hint else "")
                        + f" ({listing}: {', '.join(available)})")
    return recipe


def compose_config(
    config_name: str,
    overrides: list[str],
    groups: tuple[str, ...] = (),
    config_module: str = CONFIG_MODULE,
    searchpath: tuple[str, ...] = (),
) -> DictConfig:
    """Compose ``config_name`` (a schema or recipe) with ``overrides``; clear errors for bad keys/values.

    The primary config is looked up in ``config_module``; ``searchpath`` (e.g. ``pkg://salatrain.conf``) adds
    packages where its defaults (config groups) are found.
    """
    register()
    GlobalHydra.instance().clear()
    extra = [f"hydra.searchpath=[{','.join(searchpath)}]"] if searchpath else []
    with initialize_config_module(config_module=config_module, version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides + extra)
        except MissingConfigException as e:
            raise UserError(_missing_config_message(e, config_name)) from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise UserError(f"a YAML file of the {config_name!r} config is malformed{at}: "
                            f"{getattr(e, 'problem', None) or e}") from None
        except (ConfigCompositionException, HydraException, OmegaConfBaseException) as e:
            if isinstance(e.__cause__, yaml.YAMLError):
                raise UserError(f"a YAML file of the {config_name!r} config is malformed: {e.__cause__}") from None
            base = _compose_quietly(config_name, [o for o in overrides if override_key(o) in groups] + extra)
            raise UserError(_explain(e, overrides, base, groups)) from None


def _compose_quietly(config_name, overrides):
    try:
        return compose(config_name=config_name, overrides=overrides)
    except Exception:
        return None


def _missing_config_message(e: MissingConfigException, config_name: str) -> str:
    msg = str(e).splitlines()[0]
    options = getattr(e, "options", None)
    if options:
        msg += f"; available: {', '.join(sorted(options))}"
    return msg


def _explain(e: Exception, overrides: list[str], base: DictConfig | None, groups: tuple[str, ...]) -> str:
    if base is not None:
        valid = flat_keys(base) + list(groups)
        for o in overrides:
            key = override_key(o)
            if key is None:
                return f"cannot parse override {o!r}; use key=value"
            if key not in valid and not o.startswith("+"):
                hint = closest(key, valid)
                return f"unknown config key {key!r}" + (f"; did you mean {hint!r}?" if hint else "")
            node = OmegaConf.select(base, key, default=None) if key not in groups else None
            value = o.split("=", 1)[1].lstrip() if "=" in o else "{"  # ~key (deletion) sets no value
            if isinstance(node, DictConfig) and node and not value.startswith("{"):
                first = next(iter(node))
                return (f"{key} is a group of settings ({', '.join(map(str, node))}), not one value; set one of "
                        f"them, e.g. {key}.{first}=...")
    text = str(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and isinstance(cause, OmegaConfBaseException):
        text = str(cause)
    first = " ".join(line.strip() for line in text.splitlines()[:2] if line.strip())
    return f"invalid configuration: {first}"


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """``a=1,2 b=x,y`` → one override list per combination (Hydra's basic sweeper grammar)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    return [list(job) for job in BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]]


def structured_to_dict(obj: Any) -> dict:
    """A config dataclass as plain containers (resolved)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def structured_to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_object(cfg: DictConfig) -> Any:
    """The typed dataclass behind a composed config, every number checked against its declared range
    (raises UserError on missing, invalid or out-of-range values)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"invalid configuration: {str(e).splitlines()[0]}") from None
    try:
        check_ranges(obj)
    except UserError as e:
        source = _interpolated_from(cfg, str(e).split(" ", 1)[0])
        raise UserError(f"{e} (its value comes from {source})" if source else str(e)) from None
    return obj


def _interpolated_from(cfg: DictConfig, key: str) -> str | None:
    """The key that ``key``'s value is copied from when the config sets it as ``${other.key}`` (a recipe's
    budget), so an error names the key the user set."""
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(cfg, parent) if parent else cfg
        raw = OmegaConf.to_container(node, resolve=False).get(leaf) if isinstance(node, DictConfig) else None
    except OmegaConfBaseException:
        return None
    m = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return m.group(1) if m else None


def check_overrides_used(mod: Any, cfg: Any, overrides: list[str]) -> None:
    """A command module's ``ignored_keys(cfg)`` names the keys its chosen mode does not use (key -> why);
    setting one of them on the command line is an error rather than silence."""
    ignored = mod.ignored_keys(cfg) if hasattr(mod, "ignored_keys") else {}
    for o in overrides:
        key = override_key(o)
        if key is None:
            continue
        for k, why in ignored.items():
            if key == k or key.startswith(k + "."):
                raise UserError(f"{o} is not used {why}; drop it")


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
