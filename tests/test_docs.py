"""Docs that must not drift from the code: the README's config reference and example configs."""
from pathlib import Path

import pytest

from trainer.config import load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    assert reference_markdown() in (ROOT / "README.md").read_text(), \
        "README config reference is stale: paste trainer.config.reference_markdown() output"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.method.name and cfg.data.streams
