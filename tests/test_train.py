"""The training engine end to end, through the real CLI in subprocesses (CPU, gloo).

Covers: 2-rank ZeRO-2/3 training that learns and leaves the backbone untouched,
exact resume after SIGKILL and after SIGTERM, resume on a different number of
ranks, checkpoint contents and size, the data mixture, and bad inputs.
"""
import signal

import pytest
import torch

from launch import (Ranks, evals, kill_tree, metrics, run, start, step_losses, train_cmd, wait_for_checkpoint,
                    wait_for_step, write_config)
from mds_fixtures import tiny_run_config, two_domain_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_domain_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """The uninterrupted 12-step reference run (1 rank; 2 ranks give the same losses to ~1e-7)."""
    root = tmp_path_factory.mktemp("straight")
    cfg = config(root, data, name="straight", max_steps=12)
    run(train_cmd(write_config(cfg, root / "a.yaml")))
    return root / "straight"


def config(tmp_path, data, method="neutral_residues", name=None, stage=2, **train):
    cfg = tiny_run_config(tmp_path, data, method, **train)
    cfg["deepspeed"]["config"] = f"ds_configs/zero{stage}.json"
    if name:
        cfg["run_dir"] = str(tmp_path / name)
    return cfg


def assert_same_losses(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= tol, f"step {step}: {a[step]} != {b[step]}"


def rewind(run_dir, copy, tag: str) -> None:
    """Copy a finished run as a kill right after checkpoint `tag` would have left it: the later
    checkpoints and log lines gone. Unlike a timed kill, the resume point is exact every time."""
    import json
    import shutil

    shutil.copytree(run_dir, copy)
    ckpt = copy / "checkpoints"
    for later in ckpt.glob("step_*"):
        if later.name > tag:
            shutil.rmtree(later)
    (ckpt / "latest").write_text(tag)
    step = int(tag.split("_")[1])
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    kept = [l for l in lines if json.loads(l)["step"] <= step and "eval" not in json.loads(l)]
    (copy / "metrics.jsonl").write_text("\n".join(kept) + "\n")


@pytest.mark.distributed
@pytest.mark.parametrize("stage,launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_two_ranks_learn_new_domain_and_keep_backbone(tmp_path, data, stage, launcher):
    cfg = config(tmp_path, data, stage=stage, max_steps=24, lr=1e-2)
    cfg["log"]["frozen_checksum"] = True
    cfg["eval"]["every"] = 12
    run(train_cmd(write_config(cfg, tmp_path / "run.yaml"), nproc=2, launcher=launcher))
    run_dir = tmp_path / "run_neutral_residues"
    ev = evals(run_dir)
    assert sorted(ev) == [0, 12, 24]
    assert ev[24]["code"]["bpb"] < ev[12]["code"]["bpb"] < ev[0]["code"]["bpb"] - 0.02
    assert ev[0]["code"]["bpb"] - ev[24]["code"]["bpb"] > 0.06
    sums = [m["frozen_checksum"] for m in metrics(run_dir) if "frozen_checksum" in m]
    assert len(sums) == 2 and sums[0] == sums[1]
    first = metrics(run_dir)[0]
    assert first["world_size"] == 2 and first["zero_stage"] == stage
    assert 0.19 <= first["params"]["fraction"] <= 0.21
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tensorboard").iterdir())


@pytest.mark.distributed
def test_exact_resume_after_sigkill_of_the_launcher(tmp_path, data, straight):
    cfg = config(tmp_path, data, name="killed", max_steps=12)
    path = write_config(cfg, tmp_path / "b.yaml")
    proc = start(train_cmd(path, nproc=2), tmp_path / "killed.log")
    wait_for_checkpoint(tmp_path / "killed", proc, min_step=4)
    kill_tree(proc, signal.SIGKILL)
    proc.wait()
    resumed = run(train_cmd(path, nproc=2))
    assert "resumed from step_" in resumed.stderr
    # Resume is exact; the 1e-6 allows for the order of gloo's 2-rank sums vs the 1-rank reference.
    assert_same_losses(step_losses(straight), step_losses(tmp_path / "killed"), 1e-6)
    for domain, metrics_ in evals(straight)[12].items():
        assert evals(tmp_path / "killed")[12][domain]["bpb"] == pytest.approx(metrics_["bpb"], rel=1e-6)


def test_exact_resume_with_lora_dropout(tmp_path, data):
    """Dropout draws from the RNG that checkpoints carry; nothing else may draw from it, or the
    resumed run's masks shift (a DataLoader's new iterator after the resume did: losses off by ~2e-5)."""
    cfg = config(tmp_path, data, method="lora", name="straight", max_steps=8)
    cfg["method"]["lora_dropout"] = 0.1
    cfg["checkpoint"]["keep_last"] = 5
    cfg["eval"]["at_start"] = False
    run(train_cmd(write_config(cfg, tmp_path / "a.yaml")))
    rewind(tmp_path / "straight", tmp_path / "resumed", "step_00000004")
    cfg["run_dir"] = str(tmp_path / "resumed")
    resumed = run(train_cmd(write_config(cfg, tmp_path / "b.yaml")))
    assert "resumed from step_00000004" in resumed.stderr
    # The same world size, so the same sums in the same order: exactly equal.
    assert_same_losses(step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed"), 0.0)


@pytest.mark.distributed
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_sigterm_checkpoints_exits_75_and_resumes_on_another_world_size(tmp_path, data, straight, before, after):
    cfg = config(tmp_path, data, name="stopped", max_steps=12)
    path = write_config(cfg, tmp_path / "b.yaml")
    ranks = Ranks(path, before, tmp_path / "stopped.log")
    wait_for_step(tmp_path / "stopped", ranks, min_step=2)
    ranks.interrupt(signal.SIGTERM)
    assert ranks.wait() == [75] * before, ranks.logs()
    stopped_at = int((tmp_path / "stopped" / "checkpoints" / "latest").read_text().split("_")[1])
    assert stopped_at < 12
    resumed = run(train_cmd(path, nproc=after))
    assert f"(world size {before} -> {after})" in resumed.stderr
    # Same global batch and canonical nodes: the same samples in every step, whatever the ranks,
    # and the l1 is normalised per step, so the losses match the uninterrupted run.
    assert_same_losses(step_losses(straight), step_losses(tmp_path / "stopped"), 1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_holds_only_trainable_state(tmp_path, data, stage):
    cfg = config(tmp_path, data, stage=stage, max_steps=2)
    cfg["checkpoint"]["every"] = 2
    run(train_cmd(write_config(cfg, tmp_path / "run.yaml")))
    ckpt = tmp_path / "run_neutral_residues" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    files = list((ckpt / tag).iterdir())
    states = torch.load(next((ckpt / tag).glob("*model_states.pt")), weights_only=False)
    trainable = metrics(tmp_path / "run_neutral_residues")[0]["params"]["trainable"]
    # The trainable params are stored once, as the optimizer's fp32 master; the module state
    # has no weight at all (no frozen backbone weight, no second copy of the adapters).
    assert not [k for k, t in states["module"].items() if t.numel() > 1], sorted(states["module"])[:5]
    shapes = {k: v for group in states["param_shapes"] for k, v in group.items()}
    assert sum(s.numel() for s in shapes.values()) == trainable
    assert all("adapter" in k for k in shapes), sorted(shapes)[:5]
    size = sum(f.stat().st_size for f in files)
    state = trainable * 4 * 3  # fp32 params + two Adam moments
    assert state <= size <= 1.05 * state + 64_000, (size, state)  # + pickling and meta.json

    # Export reads the trained weights from the master: all of them, trained (w_o starts at 0).
    from trainer.export.export import trained_state
    exported = trained_state(ckpt, tag)
    assert {k: v.shape for k, v in exported.items()} == shapes
    assert all(exported[k].abs().sum() > 0 for k in exported if k.endswith("w_o"))


def test_mixture_proportion(tmp_path, data):
    cfg = config(tmp_path, data, method="adapters", max_steps=20, global_batch_size=10, micro_batch_size=5)
    cfg["data"]["p"] = 0.1
    cfg["eval"]["at_start"] = False
    p = run(train_cmd(write_config(cfg, tmp_path / "run.yaml")))
    # Flushing denormals on CPU must not make numpy warn about its own float limits.
    assert "smallest subnormal" not in p.stderr, p.stderr[-2000:]
    seen = {"en": 0, "code": 0}
    for m in metrics(tmp_path / "run_adapters"):
        for d, n in m.get("samples_by_domain", {}).items():
            seen[d] += n
    total = seen["en"] + seen["code"]
    assert total == 200
    assert 0.05 <= seen["en"] / total <= 0.15  # binomial 3-sigma band around p = 0.1


def _snapshot(d):
    return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_bad_inputs_fail_in_one_line_and_touch_nothing(tmp_path, data):
    good = config(tmp_path, data, method="finetune", max_steps=2, name="run")
    good["eval"]["at_start"] = False
    run(train_cmd(write_config(good, tmp_path / "good.yaml")))
    before = _snapshot(tmp_path / "run")

    bad_dir = {**good, "data": {**good["data"], "streams": [
        {**good["data"]["streams"][0], "train": str(tmp_path / "missing")}, good["data"]["streams"][1]]}}
    cases = {
        "missing data": (bad_dir, [], "data.streams[en].train: "),
        "typo": (good, ["train.max_step=3"], "train.max_step: unknown key"),
        "batch": (good, ["train.global_batch_size=5"], "train.global_batch_size=5 is not divisible"),
        "other method": (good, ["method.name=neutral_residues"], "checkpoint has method='finetune'"),
        "other model": (good, ["model.config.hidden_size=48"], "checkpoint has model_hash="),
    }
    for name, (cfg, overrides, needle) in cases.items():
        p = run(train_cmd(write_config(cfg, tmp_path / f"{name}.yaml"), overrides=overrides), check=False)
        assert p.returncode == 2, (name, p.stderr[-2000:])
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, (name, last)
        assert "Traceback" not in p.stderr, name
    assert _snapshot(tmp_path / "run") == before


@pytest.mark.distributed
def test_zero3_checkpoint_resumes_on_one_rank(tmp_path, data):
    """ZeRO-3 partitions the adapters themselves: 2 ranks -> 1 rank goes through the universal format too."""
    import json
    import shutil

    cfg = config(tmp_path, data, name="z3", stage=3, max_steps=8)
    cfg["checkpoint"]["keep_last"] = 5
    run(train_cmd(write_config(cfg, tmp_path / "z3.yaml"), nproc=2))
    # Rewind a copy to its step-4 checkpoint, as if the 2-rank job had been preempted there.
    shutil.copytree(tmp_path / "z3", tmp_path / "z3r")
    ckpt = tmp_path / "z3r" / "checkpoints"
    shutil.rmtree(ckpt / "step_00000008")
    (ckpt / "latest").write_text("step_00000004")
    lines = (tmp_path / "z3r" / "metrics.jsonl").read_text().splitlines()
    kept = [l for l in lines if json.loads(l)["step"] <= 4 and "eval" not in json.loads(l)]
    (tmp_path / "z3r" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    cfg["run_dir"] = str(tmp_path / "z3r")
    resumed = run(train_cmd(write_config(cfg, tmp_path / "z3r.yaml"), nproc=1))
    assert "(world size 2 -> 1)" in resumed.stderr
    assert_same_losses(step_losses(tmp_path / "z3"), step_losses(tmp_path / "z3r"), 1e-6)
