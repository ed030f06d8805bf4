"""trainer/engine/checkpoint.py without DeepSpeed: which checkpoint is loaded, and what is never deleted.

Checkpoints here are hand-made tag dirs (a torch file + meta.json with its manifest), so every
case of the selection logic runs in milliseconds; test_faults.py does the same through the CLI.
"""
import json
import os

import pytest
import torch

from trainer.config import ConfigError
from trainer.engine import checkpoint, manifest


def make(ckpt_dir, step, world_size=1):
    tag = checkpoint.tag_for(step)
    d = ckpt_dir / tag
    d.mkdir(parents=True)
    torch.save({"w": torch.full((100,), float(step))}, d / "model_states.pt")
    files = manifest.describe([d / "model_states.pt"], d)
    (d / "meta.json").write_text(json.dumps({"step": step, "tag": tag, "world_size": world_size, "files": files}))
    (ckpt_dir / "latest").write_text(tag)
    return tag


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        make(d, step)
    return d


def test_the_newest_verified_checkpoint_is_selected(ckpt):
    chosen = checkpoint.select(ckpt)
    assert (chosen.tag, chosen.refused) == ("step_00000012", [])


def test_an_unfinished_save_is_invisible(ckpt):
    (ckpt / "step_00000016").mkdir()
    torch.save({}, ckpt / "step_00000016" / "model_states.pt")  # killed before meta.json
    assert checkpoint.complete_tags(ckpt) == ["step_00000012", "step_00000008", "step_00000004"]
    assert checkpoint.select(ckpt).tag == "step_00000012"


def test_a_missing_or_stale_pointer_does_not_matter(ckpt, caplog):
    (ckpt / "latest").unlink()
    assert checkpoint.select(ckpt).tag == "step_00000012"
    assert "is missing; using step_00000012" in caplog.text
    (ckpt / "latest").write_text("step_00000004")
    assert checkpoint.select(ckpt).tag == "step_00000012"


def test_damage_falls_back_and_reports_what_it_refused(ckpt, caplog):
    os.truncate(ckpt / "step_00000012" / "model_states.pt", 10)
    (ckpt / "step_00000008" / "meta.json").write_text("{not json")
    chosen = checkpoint.select(ckpt)
    assert (chosen.tag, chosen.refused) == ("step_00000004", ["step_00000012", "step_00000008"])
    assert "falling back to step_00000004" in caplog.text


def test_nothing_verifying_is_a_refusal_never_a_fresh_start(ckpt):
    for tag in checkpoint.complete_tags(ckpt):
        os.truncate(ckpt / tag / "model_states.pt", 10)
    with pytest.raises(ConfigError, match="none of its 3 checkpoints verifies, so nothing was loaded or deleted"):
        checkpoint.select(ckpt)
    assert checkpoint.select(ckpt.parent / "elsewhere") is None  # no checkpoint at all: a fresh start


def test_an_explicit_tag_is_verified_and_a_missing_one_named(ckpt):
    assert checkpoint.select(ckpt, "step_00000008").tag == "step_00000008"
    with pytest.raises(ConfigError, match="step_00000009: no such complete checkpoint; found: step_00000012, "):
        checkpoint.select(ckpt, "step_00000009")
    os.truncate(ckpt / "step_00000008" / "model_states.pt", 10)
    with pytest.raises(ConfigError, match="step_00000008/model_states.pt: 10 bytes"):
        checkpoint.select(ckpt, "step_00000008")


def test_set_aside_keeps_everything(ckpt):
    checkpoint.set_aside(ckpt, ["step_00000012"], "damaged")
    make(ckpt, 12)
    checkpoint.set_aside(ckpt, ["step_00000012"], "damaged")
    assert sorted(p.name for p in ckpt.iterdir() if "damaged" in p.name) == ["step_00000012.damaged",
                                                                                "step_00000012.damaged1"]
    assert checkpoint.complete_tags(ckpt) == ["step_00000008", "step_00000004"]


def test_prune_keeps_the_newest_complete_and_drops_unfinished(ckpt):
    (ckpt / "step_00000002").mkdir()  # an old unfinished save
    (ckpt / "step_00000006.damaged").mkdir()
    checkpoint._prune(ckpt, keep_last=2, current="step_00000012")
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000006.damaged", "step_00000008",
                                                                    "step_00000012"]


def test_leftovers_of_an_interrupted_save_are_removed(ckpt):
    (ckpt / ".latest.tmp4242").write_text("step_00000004")
    (ckpt / "step_00000012" / ".meta.json.tmp4242").write_text("{")
    (ckpt / ".step_00000012_universal.tmp").mkdir()
    checkpoint.clean_interrupted(ckpt)
    assert not list(ckpt.glob(".*")) and not list((ckpt / "step_00000012").glob(".*"))
    assert checkpoint.select(ckpt).tag == "step_00000012"
