"""Extend a frozen Hugging Face causal LM to a new domain without forgetting (neutral residues).

Layers, from the bottom up (each imports only from the ones below it):

    config, resources, compat   typed YAML config; package data; the other libraries' internals we use
    method/                     the adapters, their injection into a model, the local loss
    engine/                     the DeepSpeed training loop, data mixture, checkpoints, ranks, logging
    export/                     adapters-only files and Hugging Face model directories
    evaluation/                 bits per byte and multiple choice on runs and exports, report, diagnose
    readapt/ demo/ bench/       tools built on the above
    __main__                    `python -m trainer <command>`, also installed as `neutral-residues`
"""
from importlib import metadata


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from a checkout that was never installed)."""
    try:
        return metadata.version("neutral-residues")
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = package_version()
