"""Shared test setup: CPU DeepSpeed, repo root on sys.path, quiet logs, an environment each test leaves as it found it."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Tests that start a process group in-process set RANK, WORLD_SIZE and MASTER_PORT; left in
    place, every later subprocess and `sbatch` submission would inherit them (a 2-task srun step
    then ran as two rank-0 processes of one)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    """`scale` tests need most of a 24 GB machine for ~20 min: collected only when `-m` names them."""
    if "scale" in (config.getoption("markexpr") or ""):
        return
    dropped = [i for i in items if i.get_closest_marker("scale")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not i.get_closest_marker("scale")]
