"""One test per library internal in trainer/compat.py, run against the installed libraries.

A version bump that changes one of these internals fails here, with a message naming the
compat function to revisit, instead of failing (or quietly misbehaving) in a training run.

The DeepSpeed checks run in one subprocess (a 1-rank gloo group on CPU, so the pytest
process never holds a process group) that records what it saw; each test then checks
its own part. Shared memory is observed through /proc/<pid>/maps and fds, so segments
other jobs on the machine create meanwhile do not matter.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launch import ROOT, env, free_port
from trainer import compat

SHM_DIR = Path("/dev/shm")
linux_shm = pytest.mark.skipif(not (SHM_DIR.is_dir() and Path("/proc/self/maps").is_file()),
                               reason="POSIX shared memory in /dev/shm and /proc: Linux only")


def _version(dist: str) -> str:
    from importlib import metadata

    return f"{dist} {metadata.version(dist)}"


def _mapped_shm() -> set[str]:
    """Names under /dev/shm this process maps or holds open (none off Linux)."""
    names = set()
    if not Path("/proc/self/maps").is_file():
        return names
    for line in Path("/proc/self/maps").read_text().splitlines():
        if f" {SHM_DIR}/" in line:
            names.add(line.split(f"{SHM_DIR}/", 1)[1].removesuffix(" (deleted)"))
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{SHM_DIR}/"):
            names.add(target[len(str(SHM_DIR)) + 1:])
    return names


# ----------------------------------------------------------------------------- DeepSpeed

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
             "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


class _Tiny(nn.Module):
    """A frozen layer and a trainable head, like a frozen backbone with an adapter."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x))).pow(2).mean()


def _engine(seed: int, **config):
    import deepspeed

    torch.manual_seed(seed)
    model = _Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={**DS_CONFIG, **config})
    return engine


def _max_diff(engine, expected: dict) -> float:
    got = dict(engine.module.named_parameters())
    return max(float((got[n].detach() - w).abs().max()) for n, w in expected.items())


def _deepspeed_worker(work: str) -> None:
    """Everything the DeepSpeed tests check, in one process; writes work/result.json."""
    import traceback

    import deepspeed

    from trainer.engine.checkpoint import convert_to_universal

    work = Path(work)
    result = {"errors": {}}

    def attempt(key, fn):
        try:
            fn()
        except Exception:
            result["errors"][key] = traceback.format_exc()

    before = _mapped_shm()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # LOCAL_SIZE=1: its CPU all-reduce buffer
    result["shm"] = sorted(_mapped_shm() - before)

    a = _engine(seed=0)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        a.backward(a(x))
        a.step()
    trainable = [n for n, p in a.module.named_parameters() if p.requires_grad]
    expected = {n: p.detach().clone() for n, p in a.module.named_parameters() if p.requires_grad}
    result["trainable"] = trainable
    ckpt = work / "ckpt"

    def save():
        with compat.module_state_dict_without(a, trainable), compat.recording_checkpoint_writes(a) as written:
            a.save_checkpoint(str(ckpt), tag="t", save_latest=False, exclude_frozen_parameters=True)
        result["written"] = sorted(Path(p).name for p in written)
        result["pt_files"] = sorted(p.name for p in (ckpt / "t").glob("*.pt"))
        result["recording_left_behind"] = "save" in vars(a.checkpoint_engine)
        result["override_left_behind"] = "module_state_dict" in vars(a)
        [states] = (ckpt / "t").glob("*model_states.pt")
        result["module_keys"] = sorted(torch.load(states, map_location="cpu", weights_only=False)["module"])

    def restore():
        b = _engine(seed=1)
        b.load_checkpoint(str(ckpt), tag="t", load_module_strict=False)
        result["diff_before_restore"] = _max_diff(b, expected)
        compat.copy_master_to_module(b)
        result["diff_after_restore"] = _max_diff(b, expected)

    def universal():
        out = convert_to_universal(ckpt, "t")
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in compat.deepspeed_checkpoint_globals()}
        unsafe = {str(p.relative_to(work)): torch.serialization.get_unsafe_globals_in_checkpoint(p)
                  for d in (ckpt / "t", out) for p in sorted(d.rglob("*.pt"))}
        result["globals_outside_allow_list"] = {k: sorted(set(v) - allowed) for k, v in unsafe.items()
                                                if set(v) - allowed}
        result["files_checked"] = len(unsafe)
        c = _engine(seed=1, checkpoint={"load_universal": True})
        c.load_checkpoint(str(out), tag="t", load_module_strict=False)
        result["diff_universal"] = _max_diff(c, expected)

    attempt("save", save)
    if "save" not in result["errors"]:
        attempt("restore", restore)
        attempt("universal", universal)
    (work / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("deepspeed")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; import test_compat; "
            f"test_compat._deepspeed_worker({str(work)!r})")
    port = str(free_port())
    e = dict(env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1",
             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    result = json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else None
    for name in (result or {}).get("shm", []):  # DeepSpeed never unlinks its buffer; the worker made it
        (SHM_DIR / name).unlink(missing_ok=True)
    assert p.returncode == 0 and result is not None, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return result


def _no_error(result: dict, key: str) -> None:
    assert key not in result["errors"], f"{_version('deepspeed')}: {key} failed:\n{result['errors'][key]}"


def test_deepspeed_module_state_dict_override_leaves_trainable_params_out(deepspeed_run):
    """compat.module_state_dict_without: DeepSpeed takes model_states' "module" from engine.module_state_dict."""
    _no_error(deepspeed_run, "save")
    saved = set(deepspeed_run["module_keys"]) & set(deepspeed_run["trainable"])
    assert not saved, (f"{_version('deepspeed')} saved {sorted(saved)} in the model-states file despite "
                       "compat.module_state_dict_without: save_checkpoint no longer gets the module's weights "
                       "from engine.module_state_dict; update that function (trainable params would be saved twice)")
    assert not deepspeed_run["override_left_behind"]


def test_deepspeed_update_lp_params_restores_the_module_from_the_master(deepspeed_run):
    """compat.copy_master_to_module: the ZeRO-1/2 optimizer's update_lp_params copies fp32 master -> module."""
    _no_error(deepspeed_run, "restore")
    assert deepspeed_run["diff_before_restore"] > 0, (
        f"{_version('deepspeed')} now restores trainable params that the model-states file lacks on a plain "
        "ZeRO-2 load; compat.copy_master_to_module may be redundant (this test can no longer tell)")
    assert deepspeed_run["diff_after_restore"] == 0, (
        f"{_version('deepspeed')}: after compat.copy_master_to_module the module differs from the saved weights "
        f"by {deepspeed_run['diff_after_restore']}; a resumed run would continue from its fresh init")


def test_universal_conversion_reads_the_master(deepspeed_run):
    """ds_to_universal (run as its documented command) on a master-only checkpoint, then load_universal."""
    _no_error(deepspeed_run, "universal")
    assert deepspeed_run["diff_universal"] == 0, (
        f"{_version('deepspeed')}: a master-only checkpoint converted to universal and loaded differs from the "
        f"saved weights by {deepspeed_run['diff_universal']}; resuming on another world size would be wrong")


def test_deepspeed_writes_every_checkpoint_file_through_its_checkpoint_engine(deepspeed_run):
    """compat.recording_checkpoint_writes: each rank learns the files it wrote, to hash them."""
    _no_error(deepspeed_run, "save")
    assert deepspeed_run["written"] == deepspeed_run["pt_files"] and deepspeed_run["written"], (
        f"{_version('deepspeed')} wrote {deepspeed_run['pt_files']} but its checkpoint_engine.save saw "
        f"{deepspeed_run['written']}: update compat.recording_checkpoint_writes (unhashed files fail verification)")
    assert not deepspeed_run["recording_left_behind"]


def test_deepspeed_checkpoints_hold_only_allow_listed_types(deepspeed_run):
    """compat.deepspeed_checkpoint_globals: everything DeepSpeed pickles, ZeRO-2 and universal files alike."""
    _no_error(deepspeed_run, "universal")
    assert deepspeed_run["files_checked"] > 3
    assert deepspeed_run["globals_outside_allow_list"] == {}, (
        f"{_version('deepspeed')} pickles types outside compat.deepspeed_checkpoint_globals: "
        f"{deepspeed_run['globals_outside_allow_list']}; every resume would refuse its checkpoints")


@linux_shm
def test_deepspeed_cpu_allreduce_buffer_name(deepspeed_run):
    """compat.deepspeed_shm_pattern matches the buffer a CPU DeepSpeed rank maps (LOCAL_SIZE = world size)."""
    names = deepspeed_run["shm"]
    assert names, (f"{_version('deepspeed')} created no shared memory at init_distributed with LOCAL_SIZE=1; "
                   "if its CPU all-reduce no longer uses /dev/shm, drop compat.deepspeed_shm_pattern")
    pattern = re.compile(compat.deepspeed_shm_pattern())
    bad = [n for n in names if not pattern.fullmatch(n)]
    assert not bad, (f"{_version('deepspeed')} names its CPU all-reduce buffer {bad}, which "
                     f"compat.deepspeed_shm_pattern() ({pattern.pattern}) does not match: clean_stale_shm "
                     "would leave a killed job's 66 MB buffers behind")


# ----------------------------------------------------------------------------- mosaicml-streaming



@pytest.fixture(scope="module")
def mds(tmp_path_factory):
    from mds_fixtures import write_mds  # imports streaming (~10 s): not in the DeepSpeed worker

    return write_mds(tmp_path_factory.mktemp("mds") / "en", "en", 1, 8, 16, 64, seed=1)


@linux_shm
def test_streaming_shm_names(mds, monkeypatch):
    """compat.streaming_shm_pattern matches every segment a StreamingDataset creates while reading an epoch."""
    from streaming import Stream, StreamingDataset

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    before = _mapped_shm()
    ds = StreamingDataset(streams=[Stream(local=str(mds))], batch_size=2, shuffle=True, shuffle_seed=1)
    assert sum(1 for _ in ds) == 8
    created = sorted(_mapped_shm() - before)
    del ds
    assert created, f"{_version('mosaicml-streaming')}: a StreamingDataset created no shared memory"
    pattern = re.compile(compat.streaming_shm_pattern())
    bad = [n for n in created if not pattern.fullmatch(n)]
    assert not bad, (f"{_version('mosaicml-streaming')} names its shared memory {bad}, which "
                     f"compat.streaming_shm_pattern() ({pattern.pattern}) does not match: clean_stale_shm "
                     "would leave a killed job's segments behind (FileExistsError in the next run)")


# One rank of a 2-rank node: streaming starts (and then destroys) the process group itself.
RANK_OF_TWO = """
import json, sys
from streaming import Stream, StreamingDataset
from trainer import compat
registers = compat.streaming_registers_prefix()
ds = StreamingDataset(streams=[Stream(local=sys.argv[1])], batch_size=2)
# streaming.base.shared.SharedMemory lists the segments it created (rather than attached to).
print(json.dumps({"registers": registers, "created": bool(ds._locals_shm.created_shms)}), flush=True)
"""


@pytest.mark.slow  # two processes importing streaming (which imports transformers): ~25 s on 2 busy cores
@linux_shm
def test_streaming_registers_the_prefix_on_the_local_leader(mds):
    """compat.streaming_registers_prefix: true on exactly the rank whose StreamingDataset creates the prefix.

    shm.registering holds its lock on that rank while the others wait; on any other rank the
    lock would not keep two jobs from taking the same prefix.
    """
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK_OF_TWO, str(mds)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [s["created"] for s in seen].count(True) == 1, seen
    assert [s["registers"] for s in seen] == [s["created"] for s in seen], (
        f"{_version('mosaicml-streaming')}: rank {[s['created'] for s in seen].index(True)} of the node registered "
        f"the shared-memory prefix, but compat.streaming_registers_prefix() says {[s['registers'] for s in seen]} "
        "for ranks 0, 1")
