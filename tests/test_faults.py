"""What a damaged or tampered run dir does, through the real CLI (engine/checkpoint.py, engine/manifest.py).

Every case starts from a copy of one finished 12-step run (checkpoints at steps 4, 8, 12),
rewound to "killed after step 8", then damaged the way a user or a cluster would. Each test
asserts the exit code, the message, and that nothing was lost: the good checkpoint still
exists and the resumed run's losses are the uninterrupted run's.
The run-dir lock and the weights fingerprint have their own files (test_lock.py,
test_fingerprint.py); the fault-injection sweep is `python -m trainer faults` (test at the end).
"""
import json
import os
import shutil
import sys

import pytest

from launch import ROOT, env, run, step_losses, train_cmd, write_config
from mds_fixtures import tiny_run_config, two_domain_data

pytestmark = pytest.mark.slow

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_domain_data(tmp_path_factory.mktemp("data"))


def config(root, data, run_dir, **train):
    cfg = tiny_run_config(root, data, **{"max_steps": 12, **train})
    cfg["run_dir"] = str(run_dir)
    cfg["checkpoint"] = {"every": 4, "keep_last": 5}
    cfg["eval"]["at_start"] = False
    return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("straight")
    run(train_cmd(write_config(config(root, data, root / "run"), root / "run.yaml")))
    return root / "run"


def rewound(straight, tmp_path, data, to_step=8):
    """A copy of the straight run as a kill right after step `to_step`'s checkpoint leaves it."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    ckpt = run_dir / "checkpoints"
    for tag in [p.name for p in ckpt.glob("step_*") if int(p.name[5:]) > to_step]:
        shutil.rmtree(ckpt / tag)
    (ckpt / "latest").write_text(f"step_{to_step:08d}")
    lines = [l for l in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= to_step]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir, write_config(config(tmp_path, data, run_dir), tmp_path / "resume.yaml")


def snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def assert_refused(p, *needles):
    assert p.returncode == 2, p.stderr[-1500:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last
    assert "Traceback" not in p.stderr


def test_a_missing_latest_resumes_from_the_newest_verified_checkpoint(straight, tmp_path, data):
    run_dir, cfg = rewound(straight, tmp_path, data)
    (run_dir / "checkpoints" / "latest").unlink()
    p = run(train_cmd(cfg))
    assert "latest is missing; using step_00000008" in p.stderr
    assert "resumed from step_00000008" in p.stderr
    assert step_losses(run_dir) == step_losses(straight)


@pytest.mark.parametrize("harm", ["overwrite", "truncate", "delete"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, data, harm):
    run_dir, cfg = rewound(straight, tmp_path, data)
    victim = run_dir / "checkpoints" / "step_00000008" / OPTIM
    if harm == "overwrite":  # 4 KiB of noise inside the optimizer state
        with open(victim, "r+b") as f:
            f.seek(victim.stat().st_size // 2)
            f.write(os.urandom(4096))
    elif harm == "truncate":
        os.truncate(victim, victim.stat().st_size // 3)
    else:
        victim.unlink()
    p = run(train_cmd(cfg))
    assert f"step_00000008/{OPTIM}" in p.stderr and "falling back to step_00000004" in p.stderr
    assert "resumed from step_00000004" in p.stderr
    # Kept for inspection, and out of the way of this run's own step-8 save.
    assert (run_dir / "checkpoints" / "step_00000008.damaged").is_dir()
    assert step_losses(run_dir) == step_losses(straight)


def test_every_checkpoint_damaged_is_a_refusal_that_deletes_nothing(straight, tmp_path, data):
    run_dir, cfg = rewound(straight, tmp_path, data)
    for tag in ("step_00000004", "step_00000008"):
        os.truncate(run_dir / "checkpoints" / tag / MODEL, 100)
    before = snapshot(run_dir)
    p = run(train_cmd(cfg), check=False)
    assert_refused(p, "none of its 2 checkpoints verifies", f"step_00000008/{MODEL}: 100 bytes")
    assert snapshot(run_dir) == before


def test_a_non_finite_loss_stops_before_saving(straight, tmp_path, data):
    """A learning rate that blows the weights up: the step-1 checkpoint stays the newest and intact."""
    run_dir = tmp_path / "diverged"
    cfg = config(tmp_path, data, run_dir, lr=1e30, warmup_steps=0)
    cfg["checkpoint"]["every"] = 1
    p = run(train_cmd(write_config(cfg, tmp_path / "d.yaml")), check=False)
    assert_refused(p, "non-finite", "stopped without saving")
    tags = sorted(t.name for t in (run_dir / "checkpoints").glob("step_*"))
    bad_step = int(p.stderr.strip().splitlines()[-1].split("step ")[1].split(":")[0])
    assert tags and tags[-1] == f"step_{bad_step - 1:08d}", (tags, bad_step)
    from trainer.engine import checkpoint
    assert checkpoint.select(run_dir / "checkpoints").tag == tags[-1]  # verifies


EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"optimizer_state_dict": Evil()}, sys.argv[1])
"""


def plant_pickle(path, marker, rewrite_manifest):
    """Replace a checkpoint file by a pickle that runs a command; optionally fix up the manifest
    too, as someone who can write the run dir would."""
    run([sys.executable, "-c", EVIL, str(path), str(marker)])
    if rewrite_manifest:
        from trainer.engine import manifest
        meta_path = path.parent / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["files"].update(manifest.describe([path], path.parent))
        meta_path.write_text(json.dumps(meta))


def test_a_crafted_pickle_is_never_executed(straight, tmp_path, data):
    run_dir, cfg = rewound(straight, tmp_path, data, to_step=12)
    for tag in ("step_00000004", "step_00000008"):  # no older checkpoint to fall back to
        shutil.rmtree(run_dir / "checkpoints" / tag)
    marker = tmp_path / "PWNED"
    plant_pickle(run_dir / "checkpoints" / "step_00000012" / OPTIM, marker, rewrite_manifest=True)
    py = [sys.executable, "-m", "trainer"]
    attempts = {
        "resume": train_cmd(cfg, overrides=["train.max_steps=14"]),
        "export": py + ["export", str(run_dir), "--out", str(tmp_path / "exp")],
        "eval": py + ["eval", str(run_dir), "--data", f"en={data['en']['val']}"],
    }
    for name, cmd in attempts.items():
        p = run(cmd, check=False)
        assert_refused(p, f"step_00000012/{OPTIM}: holds types outside the allow-list", "posix.system")
        assert not marker.exists(), name
    # readapt's Psi from a run dir goes through the same loader.
    from trainer.readapt.apply import ReadaptError, load_psi
    with pytest.raises(ReadaptError, match="outside the allow-list"):
        load_psi(run_dir, ROOT, dtype=None)
    assert not marker.exists()


def test_a_checkpoint_without_manifest_is_still_checked_for_code(straight, tmp_path, data):
    """Checkpoints of older versions have no manifest: loaded with a warning, but never their pickles' code."""
    run_dir, cfg = rewound(straight, tmp_path, data)
    meta_path = run_dir / "checkpoints" / "step_00000008" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    marker = tmp_path / "PWNED"
    plant_pickle(run_dir / "checkpoints" / "step_00000008" / MODEL, marker, rewrite_manifest=False)
    p = run(train_cmd(cfg))  # falls back to step 4, which has its manifest
    assert "has no manifest" in p.stderr and "holds types outside the allow-list" in p.stderr
    assert "resumed from step_00000004" in p.stderr and not marker.exists()
    assert step_losses(run_dir) == step_losses(straight)


def test_the_final_checkpoint_is_written_before_the_final_eval(tmp_path, data):
    """An eval that fails (here: the second shard of a val set is damaged; start-up reads only the
    first) never costs the training."""
    from streaming import MDSWriter

    from mds_fixtures import COLUMNS, markov_samples

    val = tmp_path / "val"
    with MDSWriter(out=str(val), columns=COLUMNS, compression=None, size_limit=1 << 10) as w:
        for row in markov_samples(1, 16, 32, 128, seed=5):
            w.write({"input_ids": row, "domain": "en", "num_bytes": 96})
    shards = sorted(val.glob("*.mds"))
    assert len(shards) > 1
    shards[-1].write_bytes(b"\0" * 64)
    cfg = config(tmp_path, {**data, "en": {**data["en"], "val": str(val)}}, tmp_path / "run", max_steps=3)
    p = run(train_cmd(write_config(cfg, tmp_path / "e.yaml")), check=False)
    assert p.returncode != 0
    from trainer.engine import checkpoint
    chosen = checkpoint.select(tmp_path / "run" / "checkpoints")
    assert chosen and chosen.tag == "step_00000003", p.stderr[-1500:]


def test_an_explicit_older_tag_sets_newer_ones_aside_and_strays_are_cleaned(straight, tmp_path, data):
    run_dir, cfg = rewound(straight, tmp_path, data)
    stray = run_dir / "checkpoints" / ".latest.tmp12345"  # a kill between write and rename leaves this
    stray.write_text("step_00000004")
    p = run(train_cmd(cfg, overrides=["checkpoint.resume_from=step_00000004"]))
    assert "resumed from step_00000004" in p.stderr and not stray.exists()
    assert (run_dir / "checkpoints" / "step_00000008.superseded" / MODEL).is_file()  # kept, not pruned
    assert step_losses(run_dir) == step_losses(straight)


def test_fault_injection_sweep_loses_nothing(tmp_path):
    """Kills at random moments (many inside a save) and random damage: every restart resumes from
    the newest intact checkpoint or refuses, and finished runs have the uninterrupted losses."""
    out = tmp_path / "faults.json"
    p = run([sys.executable, "-m", "trainer", "faults", "--trials", "6", "--seed", "1", "--steps", "10",
             "--work", str(tmp_path / "w"), "--out", str(out)], timeout=1200, check=False)
    tally = json.loads(out.read_text())
    assert p.returncode == 0 and tally["data_lost"] == 0, tally["events"]
    assert tally["trials"] == 6 and tally["resumes"] >= 2 and tally["corruptions"] >= 1, tally
    assert tally["kills_inside_save"] >= 1 and tally["runs_finished"] == tally["losses_equal"] >= 1, tally
