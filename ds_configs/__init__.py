"""DeepSpeed ZeRO configs, installed as package data `trainer.ds_configs` (see pyproject.toml).

A run's `deepspeed.config: ds_configs/zero2.json` resolves from the working directory first, then
here (`trainer.resources.resolve`), so the same YAML works from a checkout and after `pip install`.
"""
