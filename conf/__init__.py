"""Hydra config groups and recipes (package data of ``salatrain.conf``)."""
