"""trainer/engine/manifest.py: digests that catch every kind of damage, and pickles that cannot run code."""
import os
import pickle

import pytest
import torch

from trainer.engine import manifest
from trainer.engine.manifest import Damaged


@pytest.fixture
def ckpt(tmp_path):
    torch.save({"w": torch.arange(5000, dtype=torch.float32), "step": 3}, tmp_path / "a.pt")
    (tmp_path / "notes.txt").write_text("x" * 100)
    files = manifest.describe([tmp_path / "a.pt", tmp_path / "notes.txt"], tmp_path)
    return tmp_path, files


def test_describe_records_size_and_digest(ckpt):
    root, files = ckpt
    assert files["a.pt"]["bytes"] == (root / "a.pt").stat().st_size
    assert len(files["a.pt"][manifest.DIGEST]) == 32
    manifest.verify(root, files)  # intact: no error


def test_a_digest_computed_while_torch_save_writes_is_the_files_digest(tmp_path):
    # Several records, each larger than a read chunk, so that the hashing thread runs during the write.
    state = {f"t{i}": torch.randn(6_000_000, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    path, digests = tmp_path / "optim_states.pt", {}
    with manifest.hashed_while_written(path, digests):
        torch.save(state, path)
    assert digests[path] == manifest.file_digest(path)
    files = manifest.describe([path], tmp_path, known=digests)
    manifest.verify(tmp_path, files)


def test_a_file_that_existed_before_its_write_is_hashed_again_from_disk(tmp_path):
    path, digests = tmp_path / "a.pt", {}
    path.write_bytes(b"an older file" * 1000)
    with manifest.hashed_while_written(path, digests):
        torch.save({"w": torch.ones(10)}, path)
    assert path not in digests  # a reader could have hashed the old bytes: no digest from the write
    assert manifest.describe([path], tmp_path, known=digests)["a.pt"][manifest.DIGEST] == manifest.file_digest(path)
    with manifest.hashed_while_written(tmp_path / "never_written.pt", digests):
        pass  # a write that never happened leaves no digest, and returns
    assert tmp_path / "never_written.pt" not in digests


def test_one_changed_byte_is_caught(ckpt):
    root, files = ckpt
    data = bytearray((root / "a.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (root / "a.pt").write_bytes(bytes(data))
    with pytest.raises(Damaged, match=r"a.pt: contents differ"):
        manifest.verify_files(root, files)


def test_truncated_missing_and_extra_files_are_named(ckpt):
    root, files = ckpt
    os.truncate(root / "notes.txt", 10)
    with pytest.raises(Damaged, match=r"notes.txt: 10 bytes, the manifest says 100"):
        manifest.verify_files(root, files)
    (root / "notes.txt").unlink()
    with pytest.raises(Damaged, match=r"notes.txt: missing"):
        manifest.verify_files(root, files)
    (root / "notes.txt").write_text("x" * 100)
    torch.save({}, root / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(Damaged, match=r"zero_pp_rank_1_.*not part of this checkpoint"):
        manifest.verify_files(root, files)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_calls_a_function_is_refused_unread(tmp_path):
    torch.save({"state": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(Damaged, match=r"evil.pt: holds types outside the allow-list \(posix.system\)"):
        manifest.check_loadable(tmp_path / "evil.pt")
    # The legacy (non-zip) format is checked by the same unpickler.
    torch.save({"state": _RunsCode()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(Damaged, match="old.pt: holds a disallowed pickle"):
        manifest.check_loadable(tmp_path / "old.pt")
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump(_RunsCode(), f)
    with pytest.raises(Damaged, match="raw.pt"):
        manifest.check_loadable(tmp_path / "raw.pt")


def test_tensors_numpy_state_and_deepspeeds_types_load(tmp_path):
    import numpy as np
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"t": torch.ones(3), "rng": np.random.get_state(), "stage": ZeroStageEnum.gradients}
    torch.save(state, tmp_path / "ok.pt")
    manifest.check_loadable(tmp_path / "ok.pt")


def test_a_torch_file_cut_short_is_unreadable_not_a_traceback(ckpt):
    root, _ = ckpt
    os.truncate(root / "a.pt", 200)
    with pytest.raises(Damaged, match="a.pt: not a readable torch file"):
        manifest.check_loadable(root / "a.pt")
