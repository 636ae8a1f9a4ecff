"""Typed config schemas and their Hydra registration."""

from .schema import ConvertConfig, LightningSettings, PlanSettings, SparseSettings

__all__ = ["ConvertConfig", "LightningSettings", "PlanSettings", "SparseSettings"]
