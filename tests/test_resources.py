"""Package data: what pyproject.toml ships, and how a user's relative path finds it."""
import json
import tomllib
from pathlib import Path

from trainer import resources
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_of_the_tree():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = tool["package-dir"]
    tree = {".".join(p.parent.relative_to(ROOT).parts) for top in ("trainer", "data_prep")
            for p in (ROOT / top).rglob("__init__.py")}
    tree |= set(mapped)
    assert set(tool["packages"]) == tree
    assert mapped == {"trainer.ds_configs": "ds_configs"}
    # Every ZeRO JSON, demo YAML and the planner's measured CPU baseline are declared as package data.
    assert tool["package-data"] == {"trainer.ds_configs": ["*.json"], "trainer.demo": ["configs/*.yaml"],
                                    "trainer.planner": ["*.json"]}


def test_shipped_files_are_found_by_name():
    for name in ("zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"):
        assert json.loads(resources.ds_config(name).read_text())["zero_optimization"]
    for name in ("pretrain", "extend"):
        assert "deepspeed" in resources.demo_config(name).read_text()


def test_the_users_file_wins_then_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = resources.resolve("ds_configs/zero3.json")
    assert shipped == resources.ds_config("zero3.json") and shipped.is_file()
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text("{}")
    assert resources.resolve("ds_configs/zero3.json").resolve() == (tmp_path / "ds_configs" / "zero3.json")
    # Unknown names stay what the user wrote, so the error names their path.
    assert resources.resolve("ds_configs/zero9.json") == Path("ds_configs/zero9.json")
    assert resources.resolve("other/zero3.json") == Path("other/zero3.json")


def test_a_run_config_from_another_directory_uses_the_shipped_zero_json(tmp_path, monkeypatch):
    from trainer.engine.ds_config import load_ds_json

    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(resources.demo_config("extend")), [])
    assert load_ds_json(cfg.deepspeed.config) == json.loads(resources.ds_config("zero2.json").read_text())
