"""`python -m trainer train` refuses bad input at start-up: exit 2, one line naming the key, no run dir.

Each case used to get through start-up and fail later, after the run dir was written: a val
set with 0 samples at the final eval, a stream whose samples carry another domain (or two
streams of one domain) with a traceback at step 1, a negative learning rate not at all.
All stop before DeepSpeed or a model is set up, so each run takes seconds.
"""
import pytest
from streaming import MDSWriter

from launch import run, train_cmd, write_config
from mds_fixtures import COLUMNS, tiny_run_config, two_domain_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = two_domain_data(root, n_train=8, n_val=2)
    with MDSWriter(out=str(root / "empty"), columns=COLUMNS, compression=None):
        pass  # what `data_prep build` used to publish as val when the fraction was too small for a sample
    paths["empty"] = str(root / "empty")
    return paths


CASES = {
    "negative lr": (["train.lr=-1"], "override train.lr: -1.0 must be > 0"),
    "empty val": (["data.streams.1.val={empty}"], "data.streams[code].val: {empty}: 0 samples"),
    "other domain": (["data.streams.1.train={en}"],
                     "data.streams[code].train: {en}: its samples have domain 'en', not the stream's 'code'"),
    "same domain twice": (["data.streams.1.domain=en"],
                          "override data.streams.1.domain: 'en' is already the domain of data.streams.0 "
                          "(one stream per domain)"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_at_start_up_in_one_line_with_no_run_dir(tmp_path, data, case):
    paths = {"en": data["en"]["train"], "empty": data["empty"]}
    overrides, needle = CASES[case]
    cfg = tiny_run_config(tmp_path, data)
    cfg["run_dir"] = str(tmp_path / "run")
    p = run(train_cmd(write_config(cfg, tmp_path / "run.yaml"), overrides=[o.format(**paths) for o in overrides]),
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last == "error: " + needle.format(**paths), p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()
