"""The package as a user installs it: a wheel in a fresh venv, run from an empty directory elsewhere.

The wheel is built from a copy of the source (pip would otherwise leave build/ in the checkout)
and installed without editable mode, so only what pyproject.toml ships is there. The third-party
dependencies are the test environment's own, reached through a path entry: reinstalling 6 GB of
torch would cost several minutes of CI for nothing this test checks (the environment CI builds is
itself installed from the same pyproject.toml). Neither the checkout nor PYTHONPATH is visible to
the commands, which run with the user's working directory as the only place they may write.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    # No build isolation: setuptools comes from the test environment (no download in CI).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True)
    wheel, = (tmp / "dist").glob("neutral_residues-*.whl")
    fresh = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = str(fresh / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies: appended after the venv's own site-packages, so `trainer` resolves to the wheel.
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return fresh


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elsewhere")


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                          "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def sh(venv: Path, cwd: Path, *cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return p


def test_the_wheel_not_the_checkout_is_imported(venv, workdir):
    p = sh(venv, workdir, "python", "-c", "import trainer, data_prep; print(trainer.__file__); print(data_prep.__file__)"
           "; print(trainer.__version__)")
    trainer_file, data_prep_file, version = p.stdout.split()
    assert str(venv) in trainer_file and str(venv) in data_prep_file
    assert str(ROOT) not in p.stdout
    assert version != "unknown"


def test_both_entry_points_and_python_dash_m(venv, workdir):
    assert "usage: neutral-residues <command>" in sh(venv, workdir, "neutral-residues", "--help").stdout
    assert "usage: python -m trainer <command>" in sh(venv, workdir, "python", "-m", "trainer", "--help").stdout
    assert "build" in sh(venv, workdir, "neutral-residues-prep", "--help").stdout
    assert "build" in sh(venv, workdir, "python", "-m", "data_prep", "--help").stdout


def test_quickstart_and_every_command_from_an_empty_directory(venv, workdir):
    checkout_before = sorted(p.name for p in ROOT.iterdir())
    # The quickstart: corpus, tokenizer, data_prep build, pretrain, export, 4 extensions, report.
    p = sh(venv, workdir, "neutral-residues", "demo", "--quick", "--pretrain-steps", "20", "--extend-steps", "6")
    demo = workdir / "runs" / "demo"
    assert "| neutral_residues |" in p.stdout
    assert (demo / "report.md").is_file() and (demo / "backbone" / "hf" / "config.json").is_file()

    # data_prep through its own console script, on a file of the user's.
    (workdir / "mine.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                                                for i in range(200)))
    sh(venv, workdir, "neutral-residues-prep", "build", "--input", "mine.jsonl", "--domain", "code",
       "--tokenizer", str(demo / "tokenizer"), "--seq-len", "64", "--out", "data/mine")
    assert (workdir / "data" / "mine" / "train" / "index.json").is_file()

    # train: a user YAML next to nothing but itself; `ds_configs/zero2.json` comes from the package.
    cfg = (demo / "neutral_residues" / "config.yaml").read_text()
    assert "ds_configs/zero2.json" in cfg
    import yaml
    run = yaml.safe_load(cfg)
    run.update(run_dir="runs/mine")
    run["train"].update(max_steps=2)
    run["checkpoint"].update(every=2)
    run["data"]["streams"][1]["train"] = "data/mine/train"
    (workdir / "mine.yaml").write_text(yaml.safe_dump(run))
    sh(venv, workdir, "neutral-residues", "train", "mine.yaml", "log.progress=false")
    assert (workdir / "runs" / "mine" / "checkpoints" / "latest").is_file()

    sh(venv, workdir, "neutral-residues", "export", "runs/mine", "--out", "exports/mine")
    assert (workdir / "exports" / "mine" / "hf" / "config.json").is_file()
    sh(venv, workdir, "python", "-m", "trainer", "eval", "exports/mine/hf",
       "--data", f"en={demo / 'data' / 'en' / 'val'}", "--out", "eval.json")
    assert json.loads((workdir / "eval.json").read_text())
    sh(venv, workdir, "neutral-residues", "report", "runs/demo/lora", "runs/demo/neutral_residues",
       "--backbone", "runs/demo/pretrain", "--out", "report")
    assert (workdir / "report" / "report.md").is_file()
    sh(venv, workdir, "neutral-residues", "bench", "--size", "tiny", "--plan", "--work", "bench_plan")
    assert list((workdir / "bench_plan").rglob("*.yaml"))

    # Nothing was written into the installed package or the checkout.
    assert sorted(p.name for p in ROOT.iterdir()) == checkout_before
    site = next((venv / "lib").glob("python*/site-packages"))
    assert not (site / "runs").exists() and not (site / "trainer" / "runs").exists()
    assert not list(site.glob("trainer/**/runs"))
