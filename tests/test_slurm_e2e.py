"""The real pipeline through the SLURM templates on the local cluster (marked `slurm`).

- prep: a 3-task array job + the merge job give the same samples as one unsharded build;
- train: train.sbatch with 2 CPU ranks runs to completion;
- preemption: `scancel --signal=USR1 --batch` mid-training -> checkpoint, requeue, resume,
  and the final metrics equal those of the uninterrupted run;
- eval: eval.sbatch chained with --dependency=afterok on the training job.

They skip without a cluster (bash slurm/local_cluster.sh up), and fail instead under
REQUIRE_SLURM=1, as in CI.
"""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from slurm_fixtures import (LOCAL_CPU_OPTS, LOCAL_TRAIN_OPTS, REPO, SLURM_DIR, cancel, job_env, metrics,
                            read_log, require_cluster, sbatch, wait_job, wait_until)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    require_cluster()
    submitted: list[str] = []
    yield submitted
    cancel(submitted)


# ----------------------------------------------------------------------------- prep


WORDS = ("le chat la maison un arbre une rivière mange voit court sous dans près de grand petit rouge vert "
         "bleu vite lentement toujours jamais soleil pluie vent montagne ville village route pont forêt").split()


def write_docs(root: Path, n_files: int = 2, per_file: int = 24) -> list[Path]:
    """A few dozen distinct French-ish documents, two or three paragraphs each."""
    import random
    rng = random.Random(0)
    files = []
    for f in range(n_files):
        path = root / f"docs{f}.jsonl"
        with path.open("w") as out:
            for d in range(per_file):
                paras = ["Document %d.%d. " % (f, d) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                         + "." for _ in range(rng.randint(2, 3))]
                out.write(json.dumps({"text": "\n\n".join(paras)}, ensure_ascii=False) + "\n")
        files.append(path)
    return files


def read_samples(split_dir: Path) -> Counter:
    from streaming import LocalDataset
    ds = LocalDataset(local=str(split_dir))
    return Counter((s["domain"], s["input_ids"].tobytes(), int(s["num_bytes"])) for s in (ds[i] for i in range(len(ds))))


def run_py(args: list[str], cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=job_env(PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"


def test_prep_array_and_merge_equal_single_build(cluster, tmp_path):
    if not (REPO / "data_prep" / "__main__.py").exists():
        pytest.skip("data_prep is not in the repository yet (no data_prep/__main__.py)")
    docs = write_docs(tmp_path)
    inputs = ["--input", *map(str, docs)]
    run_py(["data_prep", "train-tokenizer", *inputs, "--out", str(tmp_path / "tok"), "--vocab-size", "300"], tmp_path)
    build = [*inputs, "--domain", "fr", "--tokenizer", str(tmp_path / "tok"), "--seq-len", "32",
             "--val-fraction", "0.2", "--seed", "0", "--compression", "none",
             "--block-bytes", "4000"]  # ~8 blocks (the unit of sharding) over 3 shards
    # prep.sbatch passes --workers $SLURM_CPUS_PER_TASK (1 here): same for the single build.
    run_py(["data_prep", "build", *build, "--workers", "1", "--out", str(tmp_path / "single")], tmp_path)

    r = subprocess.run(["bash", str(SLURM_DIR / "prep.sh"), "--shards", "3", *LOCAL_CPU_OPTS,
                        f"--output={tmp_path}/%x-%j.out", "--", *build, "--out", str(tmp_path / "sharded")],
                       cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    array_id, merge_id = r.stdout.split()
    cluster.extend([array_id, merge_id])
    logs = lambda: "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.out")))
    tasks = wait_job(array_id, timeout=180)
    assert len(tasks) == 3 and {t["JobState"] for t in tasks} == {"COMPLETED"}, logs()
    (merge,) = wait_job(merge_id, timeout=120)
    assert merge["JobState"] == "COMPLETED", logs()
    assert {f"prep shard {i}/3" for i in range(3)} <= {line.split(": job")[0][4:] for line in logs().splitlines()
                                                        if line.startswith("=== prep shard")}
    shard_docs = [json.loads((tmp_path / "sharded" / "train" / f"shard-{i:05d}" / "stats.json").read_text())["docs"]
                  for i in range(3)]
    assert all(n > 0 for n in shard_docs), f"some shards got no documents: {shard_docs}"

    for split in ("train", "val"):
        single, sharded = read_samples(tmp_path / "single" / split), read_samples(tmp_path / "sharded" / split)
        assert sum(single.values()) > 0, f"empty {split} split"
        assert sharded == single, f"{split}: {sum(sharded.values())} sharded vs {sum(single.values())} single samples"


# ----------------------------------------------------------------------------- train

# Long enough to signal mid-run on 2 busy cores, short enough for CI: ~1 s of steps per
# 10 steps for this 2-layer model (the rest of a run is start-up: imports, DeepSpeed init).
STEPS = 60


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """Tiny two-domain MDS data and a 2-layer Llama config (tests/mds_fixtures.py)."""
    from mds_fixtures import tiny_run_config, two_domain_data  # imports streaming: not at collection
    root = tmp_path_factory.mktemp("slurm_train")
    cfg = tiny_run_config(root, two_domain_data(root / "data"), max_steps=STEPS)
    cfg["checkpoint"]["every"] = 1000          # only the signal and the end write checkpoints
    cfg["log"].update(tensorboard=False, progress=False)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config


def submit_train(cluster, root: Path, config: Path, name: str) -> tuple[str, Path, Path]:
    run_dir, log = root / name, root / f"{name}.out"
    job = sbatch([*LOCAL_TRAIN_OPTS, f"--output={log}", f"--job-name={name}", str(SLURM_DIR / "train.sbatch"),
                  str(config), f"run_dir={run_dir}"], root, job_env(NODE_LOCAL_DIR=root / "local"))
    cluster.append(job)
    return job, run_dir, log


def by_step(run_dir: Path) -> tuple[dict, dict]:
    """Train and eval records of metrics.jsonl, keyed by step (a later line wins)."""
    train, evals = {}, {}
    for rec in metrics(run_dir):
        if "eval" in rec:
            evals[rec["step"]] = rec["eval"]
        elif "loss" in rec:
            train[rec["step"]] = rec
    return train, evals


@pytest.fixture(scope="module")
def reference_run(cluster, train_setup):
    """The uninterrupted run, and an eval job chained to it with --dependency=afterok."""
    root, config = train_setup
    job, run_dir, log = submit_train(cluster, root, config, "uninterrupted")
    eval_log, eval_out = root / "eval.out", root / "eval.json"
    eval_opts = [o for o in LOCAL_TRAIN_OPTS if not o.startswith("--ntasks-per-node")] + ["--ntasks-per-node=1"]
    eval_job = sbatch([*eval_opts, f"--dependency=afterok:{job}", f"--output={eval_log}",
                       str(SLURM_DIR / "eval.sbatch"), str(run_dir), "--out", str(eval_out)], root)
    cluster.append(eval_job)
    (rec,) = wait_job(job, timeout=300)
    return job, rec, run_dir, log, (eval_job, eval_log, eval_out)


def test_train_two_cpu_ranks_completes(reference_run):
    job, rec, run_dir, log, _ = reference_run
    text = read_log(log)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text
    assert rec["Restarts"] == "0"
    assert "NTASKS=2 DS_ACCELERATOR=cpu" in text
    train, evals = by_step(run_dir)
    assert sorted(train) == list(range(1, STEPS + 1)), text
    assert STEPS in evals, "no final eval"
    assert (run_dir / "checkpoints" / "latest").is_file()
    first = [r for r in metrics(run_dir) if "world_size" in r]
    assert first and first[0]["world_size"] == 2


def test_preemption_requeues_and_matches_uninterrupted_run(cluster, train_setup, reference_run):
    root, config = train_setup
    job, run_dir, log = submit_train(cluster, root, config, "preempted")
    # Signal once training has really started (the trainer's handlers are installed).
    wait_until(lambda: len(by_step(run_dir)[0]) >= 3, 240, what="training steps in metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    (rec,) = wait_job(job, timeout=300)
    text = read_log(log)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text
    assert rec["Restarts"] == "1", text

    # The log shows both attempts, the checkpoint on the signal, the requeue and the resume.
    assert text.count(f"=== train: job {job} attempt") == 2, text
    assert "train.sbatch: SIGUSR1" in text and "training step exited with code 75" in text
    assert "requeueing job" in text and "resumed from" in text, text

    stopped = re.search(r"checkpointing at step (\d+)", text)
    assert stopped and int(stopped.group(1)) < STEPS, "no checkpoint on the signal before the end; raise STEPS"

    train, evals = by_step(run_dir)
    ref_train, ref_evals = by_step(reference_run[2])
    assert sorted(train) == sorted(ref_train) == list(range(1, STEPS + 1))
    for step in ref_train:
        for key in ("loss", "lm_loss", "lm_loss_by_domain", "samples_by_domain", "tokens_seen", "lr"):
            assert train[step][key] == pytest.approx(ref_train[step][key], rel=1e-5, abs=1e-7), (step, key)
    for domain, ref in ref_evals[STEPS].items():
        for key, value in ref.items():
            assert evals[STEPS][domain][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (domain, key)


def test_eval_chained_after_training(reference_run):
    job, rec, run_dir, _, (eval_job, eval_log, eval_out) = reference_run
    (ev,) = wait_job(eval_job, timeout=300)
    text = read_log(eval_log)
    assert ev["JobState"] == "COMPLETED", text
    # afterok: the eval started only once training had finished.
    assert ev["StartTime"] >= rec["EndTime"], (ev["StartTime"], rec["EndTime"])
    results = json.loads(eval_out.read_text())
    assert results["world_size"] == 1, results
    # Same model, same val sets: the numbers of the trainer's own final eval.
    _, evals = by_step(run_dir)
    final = evals[STEPS]
    for domain, ref in final.items():
        for key in ("loss", "bpb", "tokens"):
            assert results["domains"][domain][key] == pytest.approx(ref[key], rel=1e-5), (domain, key)
