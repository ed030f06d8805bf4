"""The forgetting budget: the dual update alone, the switch back to the backbone, config errors
through the CLI, and real 1-rank runs (the multiplier moves the right way and resumes exactly)."""
import json
import math
import re
import signal
import sys

import pytest
import torch

from launch import kill_tree, metrics, run, start, step_losses, train_cmd, wait_for_checkpoint, write_config
from mds_fixtures import tiny_run_config, two_domain_data
from tiny_models import one_thread, random_batch, tiny_model  # noqa: F401
from trainer.config import ConfigError, MethodConfig, load_config
from trainer.engine.schedule import lr_lambda
from trainer.method import budget as budget_module
from trainer.method.budget import AIM, DEFAULT_DUAL_LR, LN2, P_STEPS as P, ForgettingBudget


def budget(eps=0.1, relative=False, lever="l1", dual_lr=1.0, ema=0.0):
    return ForgettingBudget(eps, relative, lever, dual_lr, ema)


def measure_bpb(b: ForgettingBudget, model_bpb: float, ref_bpb: float, nbytes: float = 100.0) -> None:
    b.measure(model_bpb * LN2 * nbytes, ref_bpb * LN2 * nbytes, nbytes)


# ----------------------------------------------------------------------------- the dual update alone


def test_violation_raises_the_multiplier_slack_lowers_it_never_below_zero():
    b = budget(eps=0.1, dual_lr=2.0)
    b.step()
    assert b.multiplier == 0.0 and b.updates == 0  # nothing measured yet: no step
    measure_bpb(b, 1.28, 1.0)  # degradation 0.28 against a setpoint of AIM * 0.1 = 0.08: violation +2
    b.step()
    # I = 2 * 2 = 4, and the proportional term adds P dual steps at once.
    assert b.integral == pytest.approx(4.0)
    assert b.multiplier == pytest.approx(4.0 + P * 4.0)
    b.step()  # the same violation: raised again, by one dual step
    assert b.multiplier == pytest.approx(8.0 + P * 4.0)
    measure_bpb(b, 1.04, 1.0)  # within the budget but under the setpoint: violation -0.4
    b.step()
    assert b.integral == pytest.approx(8.0 - 0.8)
    assert b.multiplier == pytest.approx(max(0.0, 7.2 - P * 0.8))  # lowered at once, not over many steps
    assert b.slack == pytest.approx(0.06)
    measure_bpb(b, 0.9, 1.0)  # the model beats the backbone: violation -1.8 per step
    for _ in range(10):
        b.step()
    assert b.multiplier == 0.0 and b.integral == 0.0


def test_the_integral_holds_while_the_estimate_returns_to_the_setpoint(monkeypatch):
    monkeypatch.setattr(budget_module, "TREND_STEPS", 2)  # compare with the estimate 2 steps ago
    b = budget(eps=0.1, dual_lr=1.0)  # setpoint AIM * 0.1 = 0.08

    def step_at(degradation):
        measure_bpb(b, 1.0 + degradation, 1.0)
        b.step()
        return b.integral

    assert step_at(0.3) == pytest.approx(2.2)  # no trend known yet: plain PI
    assert step_at(0.3) == pytest.approx(4.4)
    # Above the setpoint but lower than 2 steps ago: the lever is already repairing, I holds...
    assert step_at(0.2) == pytest.approx(4.4)
    assert b.multiplier == pytest.approx(4.4 + P * 1.2)  # ...while the proportional term still acts
    assert step_at(0.2) == pytest.approx(4.4)
    assert step_at(0.2) == pytest.approx(5.6)  # stalled above the setpoint: integrates again
    assert step_at(0.0) == pytest.approx(4.8)  # below it and falling: integrates down
    assert step_at(0.05) == pytest.approx(4.5)
    assert step_at(0.05) == pytest.approx(4.5)  # below it but rising back: holds
    # The window is state: a copy resumed from it takes the same next step.
    other = budget(eps=0.1, dual_lr=1.0)
    other.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert step_at(0.0) == pytest.approx(4.5 - 0.8)
    measure_bpb(other, 1.0, 1.0)
    other.step()
    assert other.state_dict() == b.state_dict()


def test_estimate_is_an_ema_of_sums_and_steps_without_original_tokens_change_nothing():
    b = budget(eps=0.1, ema=0.5)
    measure_bpb(b, 1.2, 1.0, nbytes=100)
    assert b.degradation == pytest.approx(0.2) and b.last == pytest.approx(0.2)
    b.measure(0.0, 0.0, 0.0)  # no original tokens this step
    assert b.measurements == 1 and b.degradation == pytest.approx(0.2)
    measure_bpb(b, 1.0, 1.0, nbytes=300)  # no degradation on 3x the bytes
    # Sums, not means, are smoothed: (0.5*0.2*100 + 0.5*0*300) / (0.5*100 + 0.5*300)
    assert b.degradation == pytest.approx(0.05) and b.last == pytest.approx(0.0)


def test_relative_budget_is_a_fraction_of_the_backbone_estimate():
    b = budget(eps=0.02, relative=True)
    assert b.eps_bpb is None
    measure_bpb(b, 2.1, 2.0)
    assert b.eps_bpb == pytest.approx(0.04) and b.backbone_bpb == pytest.approx(2.0)
    b.step()
    violation = (0.1 - AIM * 0.04) / 0.04  # in budgets of 4% of the backbone's 2.0
    assert b.multiplier == pytest.approx((1 + P) * violation)


def test_levers_and_state_round_trip_exactly():
    l1 = budget(lever="l1")
    replay = budget(lever="replay")
    for b in (l1, replay):
        measure_bpb(b, 1.37, 1.0)
        b.step()
    assert l1.l1_weight == l1.multiplier > 0 and l1.replay_weight == 0
    assert replay.l1_weight is None and replay.replay_weight == replay.multiplier > 0
    # The replay lever also shortens the steps (Adam ignores a loss weight's size); the l1 lever does not.
    assert l1.lr_scale == 1.0 and replay.lr_scale == pytest.approx(1 / (1 + replay.multiplier))

    l1.reference = [[12.5, 30.0], [11.0, 29.0]]
    state = json.loads(json.dumps(l1.state_dict()))  # plain data: a checkpoint's client dict holds it
    other = ForgettingBudget(0.1, False, "l1", 5.0, 0.0, dual_lr_given=False)
    other.load_state_dict(state)
    assert other.state_dict() == l1.state_dict()
    with pytest.raises(ValueError, match="lever"):
        budget(lever="replay").load_state_dict(state)


def test_config_forms_of_the_budget():
    assert MethodConfig(forgetting_budget=0.01).budget == (0.01, False)
    assert MethodConfig(forgetting_budget="2%").budget == (pytest.approx(0.02), True)
    assert MethodConfig(forgetting_budget="1e-2").budget == (0.01, False)  # YAML 1.1 reads 1e-2 as a string
    assert MethodConfig().budget is None
    # sigmoid_gate's lever is its l1, which a budget turns on.
    assert MethodConfig(name="sigmoid_gate", forgetting_budget=0.01).uses_l1
    assert not MethodConfig(name="sigmoid_gate").uses_l1
    # The meter defaults to the original stream's held-out set, and to its training rows without one.
    run = {"model": {"config": {"model_type": "llama"}}, "method": {"forgetting_budget": 0.01},
           "data": {"p": 0.1, "streams": [{"domain": "en", "role": "original", "train": "/en/train", "val": "/en/val"},
                                          {"domain": "code", "train": "/code/train"}]}}
    assert load_config(data=run).method.budget_measure == "heldout"
    del run["data"]["streams"][0]["val"]
    assert load_config(data=run).method.budget_measure == "train"
    # finetune has no backbone to switch back to: it can only measure on held-out data.
    with pytest.raises(ConfigError, match="val is not set"):
        load_config(data={**run, "method": {"name": "finetune", "forgetting_budget": 0.01}})
    # The dual step size defaults per lever (the replay lever acts through the weight and the step size).
    assert ForgettingBudget.from_config(MethodConfig(forgetting_budget=0.01), 0.8).dual_lr == DEFAULT_DUAL_LR["l1"]
    for name in ("adapters", "lora", "finetune"):
        b = ForgettingBudget.from_config(MethodConfig(name=name, forgetting_budget=0.01), 0.8)
        assert b.lever == "replay" and b.dual_lr == DEFAULT_DUAL_LR["replay"] < DEFAULT_DUAL_LR["l1"]
    assert ForgettingBudget.from_config(MethodConfig(name="lora", forgetting_budget=0.01, dual_lr=0.3), 0.8).dual_lr == 0.3
    for bad in (-0.01, 0, "abc", "-2%"):
        with pytest.raises(ConfigError, match="method.forgetting_budget"):
            MethodConfig(forgetting_budget=bad)


# ----------------------------------------------------------------------------- the backbone switch


@pytest.mark.parametrize("method", ["adapters", "neutral_residues", "lora"])
def test_backbone_only_computes_the_backbone_exactly(method):
    from trainer.method.extend import backbone_only, extend_model

    model = tiny_model("llama")
    ids = random_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    added = extend_model(model, MethodConfig(name=method))
    with torch.no_grad():
        for m in added:  # make every added branch count: W_o and LoRA's B start at zero
            for name, p in m.named_parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.5)
        extended = model(input_ids=ids).logits
        with backbone_only(model):
            switched = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (extended - before).abs().max() > 1e-3
    torch.testing.assert_close(switched, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, extended, rtol=0, atol=0)  # the switch is undone
    assert all(p.requires_grad for m in added for n, p in m.named_parameters() if "lora_" in n or "adapter" in n)


def test_backbone_only_refuses_finetune():
    from trainer.method.extend import backbone_only, extend_model

    model = tiny_model("llama")
    extend_model(model, MethodConfig(name="finetune"))
    with pytest.raises(ValueError, match="finetune"):
        with backbone_only(model):
            pass


# ----------------------------------------------------------------------------- config errors, through the CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_domain_data(tmp_path_factory.mktemp("data"))


def test_bad_budgets_are_one_line_config_errors(tmp_path, data, capsys):
    cfg = tiny_run_config(tmp_path, data, "neutral_residues")
    only_new = {**cfg, "data": {"p": 0.0, "streams": [cfg["data"]["streams"][1]]}}
    no_val = {**cfg, "method": {"name": "finetune"},
              "data": {**cfg["data"], "streams": [{k: v for k, v in cfg["data"]["streams"][0].items() if k != "val"},
                                                  cfg["data"]["streams"][1]]}}
    cases = {
        "negative": (cfg, ["method.forgetting_budget=-0.01"], "override method.forgetting_budget: -0.01 must be > 0"),
        "not a number": (cfg, ["method.forgetting_budget=lots"], "method.forgetting_budget: 'lots' is not a number"),
        "no original stream": (only_new, ["method.forgetting_budget=0.01"], "no stream has role: original"),
        "p = 0": (cfg, ["data.p=0", "method.forgetting_budget=0.01"], "data.p = 0"),
        "finetune without val": (no_val, ["method.forgetting_budget=2%"], "data.streams[en].val is not set"),
        "finetune on train rows": (cfg, ["method.name=finetune", "method.forgetting_budget=0.01",
                                         "method.budget_measure=train"], "method.budget_measure: finetune"),
        "dual_lr": (cfg, ["method.forgetting_budget=0.01", "method.dual_lr=0"], "method.dual_lr: 0.0 must be > 0"),
    }
    from trainer.engine.train import main

    # The CLI's own function in this process (an interpreter start per case would cost seconds)...
    for name, (c, overrides, needle) in cases.items():
        assert main([str(write_config(c, tmp_path / "c.yaml")), *overrides]) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, lines)
    # ... and once as a user runs it.
    p = run(train_cmd(write_config(cfg, tmp_path / "c.yaml"), overrides=["method.forgetting_budget=-1"]), check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: override method.forgetting_budget: -1.0 must be > 0 (a zero budget has no finite multiplier)"]
    assert not (tmp_path / "run_neutral_residues").exists()


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def english_backbone(tmp_path_factory, data):
    """A tiny backbone pretrained on the original domain only, so that learning the new one forgets it."""
    root = tmp_path_factory.mktemp("backbone")
    cfg = tiny_run_config(root, data, "finetune", max_steps=40, lr=1e-2, global_batch_size=8, micro_batch_size=8)
    cfg["data"]["p"] = 1.0
    cfg["eval"]["at_start"] = False
    cfg["log"]["tensorboard"] = False
    cfg["checkpoint"]["every"] = 40
    path = write_config(cfg, root / "pretrain.yaml")
    script = ("import sys\nfrom pathlib import Path\nfrom trainer.config import load_config\n"
              "from trainer.engine.train import train\nfrom trainer.export.export import export\n"
              "cfg = load_config(sys.argv[1])\ntrain(cfg)\nexport(Path(cfg.run_dir), Path(sys.argv[2]), only='hf')\n")
    run([sys.executable, "-c", script, str(path), str(root / "export")])
    return root / "export" / "hf"


def budget_config(root, data, backbone, method, eps, name, measure=None, **train):
    """A tiny run at budget eps; `measure` None is the default meter (held out: the data has a val set)."""
    cfg = tiny_run_config(root, data, method, **{"max_steps": 16, "lr": 1e-2, "warmup_steps": 1, **train})
    cfg["model"] = {"path": str(backbone)}
    cfg["method"]["forgetting_budget"] = eps
    if measure is not None:
        cfg["method"]["budget_measure"] = measure
    cfg["run_dir"] = str(root / name)
    cfg["checkpoint"] = {"every": 4, "keep_last": 5}
    return cfg


def budget_records(run_dir) -> dict[int, dict]:
    return {m["step"]: m["budget"] for m in metrics(run_dir) if "budget" in m}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["neutral_residues", "adapters"])
def test_a_tighter_budget_gives_a_larger_multiplier(tmp_path, data, english_backbone, method):
    runs = {}
    configs = []
    for eps in (0.001, 10.0):
        # The train meter: a measurement, hence a dual step, at every step (the probe's come every 5).
        cfg = budget_config(tmp_path, data, english_backbone, method, eps, f"eps{eps}", measure="train")
        configs.append(str(write_config(cfg, tmp_path / f"eps{eps}.yaml")))
        runs[eps] = tmp_path / f"eps{eps}"
    script = ("import sys\nfrom trainer.config import load_config\nfrom trainer.engine.train import train\n"
              "for path in sys.argv[1:]:\n    train(load_config(path))\n")
    run([sys.executable, "-c", script, *configs])

    tight, loose = budget_records(runs[0.001]), budget_records(runs[10.0])
    assert sorted(tight) == list(range(1, 17))  # every logged step
    for rec in tight.values():
        assert {"lambda", "degradation", "slack", "eps_bpb", "meter_share"} <= rec.keys()
        assert 0 < rec["meter_share"] < 1  # the reference forward's share of the step's wall time
        assert rec["slack"] == pytest.approx(rec["eps_bpb"] - rec["degradation"])
    assert max(r["degradation"] for r in tight.values()) > 0.001  # learning code does forget English here
    assert tight[16]["lambda"] > 0.5
    assert all(r["lambda"] == 0.0 for r in loose.values())  # never violated
    # The multiplier is what weights the lever: the l1 weight, or the original tokens' LM loss.
    lines = {m["step"]: m for m in metrics(runs[0.001]) if "loss" in m}
    for step in range(2, 17):
        lam = tight[step - 1]["lambda"]  # the weight used in a step is the previous step's multiplier
        if method == "neutral_residues":
            assert lines[step]["local_loss"] == pytest.approx(lam * lines[step]["local"]["l1"], rel=1e-4, abs=1e-9)
        else:
            en = lines[step]["lm_loss_by_domain"].get("en")
            expected = lam * en if en is not None else 0.0
            assert lines[step]["local_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
    tb = list((runs[0.001] / "tensorboard").iterdir())
    assert tb and any(b"budget/lambda" in f.read_bytes() for f in tb)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "finetune"])
def test_exact_resume_with_the_multiplier(tmp_path, data, english_backbone, method):
    """Killed after a checkpoint, resumed: the same losses and the same multiplier at every step."""
    script = ("import sys\nfrom trainer.config import load_config\nfrom trainer.engine.train import train\n"
              "train(load_config(sys.argv[1]))\n")
    straight = budget_config(tmp_path, data, english_backbone, method, 0.002, "straight", max_steps=24)
    if method == "finetune":
        straight["train"]["lr"] = 3e-3
    run([sys.executable, "-c", script, str(write_config(straight, tmp_path / "straight.yaml"))])
    killed = {**straight, "run_dir": str(tmp_path / "killed")}
    path = write_config(killed, tmp_path / "killed.yaml")
    proc = start(train_cmd(path), tmp_path / "killed.log")
    wait_for_checkpoint(tmp_path / "killed", proc, min_step=8)
    kill_tree(proc, signal.SIGKILL)
    proc.wait()
    resumed = run(train_cmd(path))
    at = re.search(r"resumed from step_(\d+)", resumed.stderr)
    assert at and 8 <= int(at.group(1)) < 24, resumed.stderr[-2000:]

    a, b = budget_records(tmp_path / "straight"), budget_records(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert a[24]["lambda"] > 0  # the multiplier was live, so its restore matters
    for step in a:
        a[step].pop("meter_share"), b[step].pop("meter_share")  # wall time, not state
        assert b[step] == a[step], step  # plain floats restored: bit for bit
    la, lb = step_losses(tmp_path / "straight"), step_losses(tmp_path / "killed")
    assert la.keys() == lb.keys()
    for step in la:
        assert math.isclose(la[step], lb[step], rel_tol=0, abs_tol=1e-6), step
    # The replay lever: each logged lr (the next step's) is the schedule's over 1 + lambda.
    schedule, base = lr_lambda(load_config(data=straight)), load_config(data=straight).lr
    logged = {m["step"]: m["lr"] for m in metrics(tmp_path / "straight") if "lr" in m}
    assert sorted(logged) == list(range(1, 25))
    for step, lr in logged.items():
        assert lr == pytest.approx(base * schedule(step) / (1 + a[step]["lambda"]), rel=1e-9), step


@pytest.mark.slow
def test_a_run_metered_on_its_training_rows_resumes_only_on_them(tmp_path, data, english_backbone):
    """The held-out probe needs the backbone's loss, taken before the first step: a run started with the train
    meter (the default before the held-out one) cannot switch to it, and says how to go on."""
    cfg = budget_config(tmp_path, data, english_backbone, "adapters", 0.002, "run", "train", max_steps=4)
    run(train_cmd(write_config(cfg, tmp_path / "train.yaml")))
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 8}}
    del longer["method"]["budget_measure"]  # the default: held out, since the data has a val set
    p = run(train_cmd(write_config(longer, tmp_path / "default.yaml")), check=False)
    assert p.returncode == 2 and "resume it with method.budget_measure=train" in p.stderr.strip().splitlines()[-1]
    run(train_cmd(write_config(longer, tmp_path / "default.yaml"), overrides=["method.budget_measure=train"]))
    assert sorted(budget_records(tmp_path / "run")) == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_under_zero3_follow_the_one_rank_multiplier(tmp_path, data, english_backbone):
    """The measurement is summed over ranks, so 2 ranks hold the 1-rank multiplier; under ZeRO-3 a rank
    whose batch has no original rows still joins the reference forward (else the others would hang)."""
    one = budget_config(tmp_path, data, english_backbone, "adapters", 0.002, "one", "train", max_steps=12)
    two = {**budget_config(tmp_path, data, english_backbone, "adapters", 0.002, "two", "train", max_steps=12),
           "deepspeed": {"config": "ds_configs/zero3.json"}}
    two["train"]["micro_batch_size"] = 1
    run(train_cmd(write_config(one, tmp_path / "one.yaml")))
    run(train_cmd(write_config(two, tmp_path / "two.yaml"), nproc=2))
    a, b = budget_records(tmp_path / "one"), budget_records(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 13)) and a[12]["lambda"] > 0
    for step in a:
        for key in ("lambda", "degradation"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-8), (step, key)
