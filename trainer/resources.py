"""Files that ship inside the package, and how a user's relative path finds them.

A run's YAML says `deepspeed.config: ds_configs/zero2.json`. Read from a checkout that is
`./ds_configs/zero2.json`; after `pip install` in a scratch directory it is the copy installed
as `trainer.ds_configs`. The user's own file always wins: a relative path resolves from the
working directory first, and only a path that does not exist there falls back to the package.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_file(package: str, *parts: str) -> Path:
    """A real path to a package-data file (pip installs packages as plain directories)."""
    return Path(str(resources.files(package).joinpath(*parts)))


def ds_config(name: str) -> Path:
    """A shipped ZeRO config by file name, e.g. `ds_config("zero3.json")`."""
    return packaged_file("trainer.ds_configs", name)


def demo_config(name: str) -> Path:
    """A shipped demo YAML by stem, e.g. `demo_config("extend")`."""
    return packaged_file("trainer.demo", "configs", f"{name}.yaml")


def resolve(path: str | Path) -> Path:
    """`path` as the user meant it: absolute, else from the working directory, else shipped.

    Returns the working-directory path when nothing matches, so the caller's "file not found"
    names what the user wrote.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    if p.parent.as_posix() == "ds_configs" and ds_config(p.name).is_file():
        return ds_config(p.name)
    return p
