"""Rank detection under the launchers users have: srun tasks, torch launchers, a lone process."""
import os

import pytest

from trainer.engine.dist import detect_world

LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean(monkeypatch):
    for k in list(os.environ):
        if k in LAUNCHER or k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    return monkeypatch


def test_srun_task_is_translated_without_touching_the_environment(clean):
    clean.setenv("SLURM_PROCID", "3")
    clean.setenv("SLURM_NTASKS", "8")
    clean.setenv("SLURM_LOCALID", "1")
    clean.setenv("SLURM_STEP_ID", "0")
    clean.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x4)")
    before = dict(os.environ)
    world = detect_world()
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (3, 8, 1, 2)
    # A later `sbatch` from this process (or a child) must not inherit a rank of ours.
    assert dict(os.environ) == before


def test_a_launchers_rank_wins_over_srun(clean):
    clean.setenv("SLURM_PROCID", "1")
    clean.setenv("SLURM_NTASKS", "2")
    clean.setenv("RANK", "5")
    clean.setenv("WORLD_SIZE", "16")
    world = detect_world()
    assert (world.rank, world.world_size) == (5, 16)


def test_batch_step_alone_is_one_process(clean):
    clean.setenv("SLURM_PROCID", "0")  # sbatch sets it for the batch script too, outside srun
    clean.setenv("SLURM_JOB_ID", "42")
    world = detect_world()
    assert (world.rank, world.world_size, world.is_main) == (0, 1, True)
