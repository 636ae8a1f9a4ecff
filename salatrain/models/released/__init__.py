"""Modeling code written next to checkpoints exported in MiniCPM-SALA's released format.

``configuration_minicpm_sala.py`` and ``modeling_minicpm_sala.py`` import only torch and transformers (and each
other): they are copied into the exported directory, whose ``config.json`` names them in ``auto_map``, and are
not imported by salatrain itself.
"""
