"""Export: adapters-only files and full HF dirs whose logits equal the trained model's.

The full HF dirs are loaded in a FRESH interpreter with this repo out of reach
(no PYTHONPATH, cwd elsewhere, an installed copy hidden, `import trainer` asserted
to fail), for every method trained for real and for each supported backbone
family. A gated export's remote code is the package's own modeling_parallel_adapter.py
and adapter.py, copied byte for byte; `is_own_export` recognises exactly that.
The adapters-only file is also saved from inside a 2-rank ZeRO-3 engine (run as
`torchrun tests/test_export.py zero3 OUT`) and compared with one process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import HIDE_PROJECT, ROOT, env, free_port, run
from tiny_models import FAMILIES, random_batch, tiny_model
from trained_runs import METHODS, shared_runs

IDS = random_batch(2, 24, seed=5)
GATED = ("neutral_residues", "sigmoid_gate")
EXPORT_FAMILIES = FAMILIES + ("gemma2",)  # every backbone the modeling file has classes for
REMOTE_CODE = ("modeling_parallel_adapter.py", "adapter.py")
PACKAGE_CODE = ROOT / "trainer" / "method"

# Runs in the fresh interpreter: loads each listed dir, saves its logits on the same ids.
LOADER = HIDE_PROJECT + r'''
import json, torch
from transformers import AutoModelForCausalLM
manifest = json.load(open(sys.argv[1]))
ids = torch.load(manifest["ids"])
out = {}
for name, d in manifest["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = {"logits": model(ids).logits, "class": type(model).__name__,
                     "mlp_module": type(model.model.layers[0].mlp).__module__}
    try:  # without trust_remote_code a gated export must refuse to load, not drop its adapters
        AutoModelForCausalLM.from_pretrained(d)
        out[name]["plain_load"] = "loaded"
    except Exception as e:
        out[name]["plain_load"] = type(e).__name__
torch.save(out, manifest["out"])
'''


def fresh_process_logits(dirs: dict[str, Path], tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(IDS, tmp / "ids.pt")
    manifest = {"ids": str(tmp / "ids.pt"), "out": str(tmp / "out.pt"), "dirs": {k: str(v) for k, v in dirs.items()}}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    (tmp / "load.py").write_text(LOADER)
    e = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    e["HF_HOME"] = str(tmp / "hf_home")  # the dynamic-module cache, kept out of ~/.cache
    p = subprocess.run([sys.executable, str(tmp / "load.py"), str(tmp / "manifest.json")], cwd=tmp, env=e,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return torch.load(tmp / "out.pt")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Every trained method exported with the CLI, plus each family's remote-code/merged dirs."""
    from transformers import AutoModelForCausalLM

    from trainer.export import export
    from trainer.config import MethodConfig
    from trainer.method.extend import adapter_blocks, extend_model
    from trainer.export.hf_export import save_with_remote_code

    root = tmp_path_factory.mktemp("exported")
    cases = {}
    backbone = logits(AutoModelForCausalLM.from_pretrained(runs["backbone"]).eval())
    for method, run_dir in runs["runs"].items():
        assert export.main([str(run_dir), "--out", str(root / method)]) == 0
        _, model = export.load_trained(run_dir)
        cases[method] = {"dir": root / method / "hf", "ref": logits(model), "backbone": backbone}
    for family in EXPORT_FAMILIES:
        for method in ("neutral_residues", "adapters"):
            model = tiny_model(family)
            mc = MethodConfig(name=method)
            extend_model(model, mc)
            torch.manual_seed(1)
            for block in adapter_blocks(model):  # W_o = 0 at init would make any adapter bug invisible
                torch.nn.init.normal_(block.adapter.w_o, std=0.5)
            model.eval()
            ref = logits(model)
            name = f"{family}_{method}"
            save_with_remote_code(model, mc, root / name)
            cases[name] = {"dir": root / name, "ref": ref, "backbone": logits(tiny_model(family))}
    loaded = fresh_process_logits({k: v["dir"] for k, v in cases.items()}, root / "fresh")
    return {name: {**case, **loaded[name]} for name, case in cases.items()}


TRAINED = list(METHODS)
FAMILY_CASES = [f"{f}_{m}" for f in EXPORT_FAMILIES for m in ("neutral_residues", "adapters")]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED + FAMILY_CASES)
def test_full_hf_dir_gives_the_trained_logits_in_a_fresh_process(exported, name):
    case = exported[name]
    assert not torch.allclose(case["ref"], case["backbone"], atol=1e-4), "the model equals its backbone"
    torch.testing.assert_close(case["logits"], case["ref"], atol=2e-5, rtol=1e-5)
    family, method = name.split("_", 1) if name.split("_")[0] in EXPORT_FAMILIES else ("llama", name)
    cfg = json.loads((case["dir"] / "config.json").read_text())
    if method in GATED:
        assert case["class"].startswith("ParallelAdapter") and case["class"] == cfg["architectures"][0]
        assert cfg["model_type"] == f"parallel_adapter_{family}"
        assert case["plain_load"] != "loaded"
        assert case["mlp_module"].endswith(".adapter")  # the block came from the shipped adapter.py
        for f in REMOTE_CODE:
            assert (case["dir"] / f).read_bytes() == (PACKAGE_CODE / f).read_bytes(), f
    else:  # finetune, lora and ungated adapters are plain HF models of the backbone's class
        assert case["class"].endswith("ForCausalLM") and not case["class"].startswith("ParallelAdapter")
        assert case["plain_load"] == "loaded"
        assert "auto_map" not in cfg and not any((case["dir"] / f).exists() for f in REMOTE_CODE)


# ----------------------------------------------------------------------------- remote code: one source


@pytest.fixture(scope="module")
def gated_export(tmp_path_factory):
    """A gated tiny-Llama export, written in-process (no training, no load)."""
    from trainer.config import MethodConfig
    from trainer.export.hf_export import save_with_remote_code
    from trainer.method.extend import extend_model

    model = tiny_model("llama")
    mc = MethodConfig(name="neutral_residues")
    extend_model(model, mc)
    return save_with_remote_code(model, mc, tmp_path_factory.mktemp("gated") / "hf")


def test_gated_export_ships_the_modules_training_imports(gated_export):
    from trainer.export.hf_export import is_own_export
    from trainer.method import adapter, modeling_parallel_adapter

    assert Path(adapter.__file__).resolve() == PACKAGE_CODE / "adapter.py"
    assert Path(modeling_parallel_adapter.__file__).resolve() == PACKAGE_CODE / "modeling_parallel_adapter.py"
    for f in REMOTE_CODE:
        assert (gated_export / f).read_bytes() == (PACKAGE_CODE / f).read_bytes(), f
    cfg = json.loads((gated_export / "config.json").read_text())
    assert cfg["model_type"] == "parallel_adapter_llama"
    assert cfg["auto_map"] == {"AutoConfig": "modeling_parallel_adapter.ParallelAdapterLlamaConfig",
                               "AutoModelForCausalLM": "modeling_parallel_adapter.ParallelAdapterLlamaForCausalLM"}
    assert is_own_export(gated_export)


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


QWEN2_PAIR = {"AutoConfig": "modeling_parallel_adapter.ParallelAdapterQwen2Config",
              "AutoModelForCausalLM": "modeling_parallel_adapter.ParallelAdapterQwen2ForCausalLM"}
EDITS = {
    "comment_in_adapter": lambda d: _append(d / "adapter.py", "# harmless, but not what export wrote\n"),
    "code_in_modeling_file": lambda d: _append(d / "modeling_parallel_adapter.py", "print('hello')\n"),
    "adapter_missing": lambda d: (d / "adapter.py").unlink(),
    "auto_map_of_another_backbone": lambda d: _edit_config(d, auto_map=QWEN2_PAIR),
    "extra_auto_map_entry": lambda d: _edit_config(d, auto_map={
        **json.loads((d / "config.json").read_text())["auto_map"], "AutoTokenizer": "tok.Tokenizer"}),
    # What the previous exporter wrote: one generated file, one generic class pair.
    "previous_single_file_export": lambda d: _edit_config(d, auto_map={
        "AutoConfig": "modeling_parallel_adapter.ParallelAdapterConfig",
        "AutoModelForCausalLM": "modeling_parallel_adapter.ParallelAdapterForCausalLM"}),
    "unsupported_backbone": lambda d: _edit_config(d, model_type="parallel_adapter_gpt2"),
    "backbone_model_type": lambda d: _edit_config(d, model_type="llama"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_is_own_export_refuses_anything_but_the_exact_files(gated_export, tmp_path, edit):
    import shutil

    from trainer.export.hf_export import is_own_export

    d = tmp_path / "hf"
    shutil.copytree(gated_export, d)
    assert is_own_export(d)
    EDITS[edit](d)
    assert not is_own_export(d)


def test_modeling_file_has_classes_for_every_supported_backbone():
    from trainer.method import modeling_parallel_adapter as modeling
    from trainer.method.extend import SUPPORTED_CLASSES

    backbones = set()
    for base_type, (config_cls, model_cls) in modeling.CLASSES.items():
        assert config_cls.model_type == f"parallel_adapter_{base_type}"
        assert model_cls.config_class is config_cls
        backbone = next(c for c in model_cls.__mro__[1:] if c.__name__ in SUPPORTED_CLASSES)
        assert backbone.config_class.model_type == base_type and issubclass(config_cls, backbone.config_class)
        backbones.add(backbone.__name__)
    assert backbones == set(SUPPORTED_CLASSES)


def test_shipped_files_import_only_torch_transformers_and_each_other():
    """They run wherever the export is loaded: nothing of this repo may leak in."""
    import ast

    def imports(name):
        tree = ast.parse((PACKAGE_CODE / name).read_text())
        absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        absolute |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        relative = {(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        return absolute, relative

    assert imports("adapter.py") == ({"__future__", "torch"}, set())
    assert imports("modeling_parallel_adapter.py") == ({"transformers"}, {(1, "adapter")})


@pytest.mark.slow
def test_merged_adapters_widen_the_ffn_by_the_adapter_width(exported, runs):
    from trainer.export.adapters_io import read_adapter_config

    cfg = json.loads((exported["adapters"]["dir"] / "config.json").read_text())
    h = read_adapter_config(exported["adapters"]["dir"].parent / "adapters")["adapter_hidden_size"]
    backbone = json.loads((runs["backbone"] / "config.json").read_text())
    assert cfg["intermediate_size"] == backbone["intermediate_size"] + h
    assert "auto_map" not in cfg and cfg["model_type"] == "llama"


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m != "finetune"])
def test_adapters_only_file_round_trip_and_exact_keys(exported, runs, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer.export.adapters_io import load_adapters
    from trainer.method.extend import trainable_named_parameters

    path = exported[method]["dir"].parent / "adapters"
    model = AutoModelForCausalLM.from_pretrained(runs["backbone"]).eval()
    n_backbone = sum(p.numel() for p in model.parameters())
    load_adapters(model, path)
    torch.testing.assert_close(logits(model.eval()), exported[method]["ref"], atol=1e-6, rtol=1e-6)
    saved = load_file(str(path / "adapters.safetensors"))
    assert set(saved) == {n for n, _ in trainable_named_parameters(model)}
    assert 0.1 * n_backbone < sum(t.numel() for t in saved.values()) < 0.3 * n_backbone  # extra_params = 0.2


@pytest.mark.slow
def test_hf_dir_in_bfloat16_is_half_the_size_and_close(exported, runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer.export import export

    assert export.main([str(runs["runs"]["lora"]), "--out", str(tmp_path), "--only", "hf", "--dtype", "bfloat16"]) == 0
    assert not (tmp_path / "adapters").exists()
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(model), exported["lora"]["ref"], atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_export_refuses_bad_input(runs, tmp_path, capsys):
    from trainer.export import export

    assert export.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs["runs"]["lora"] / "config.yaml").read_text())
    assert export.main([str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no complete checkpoint" in err and err.count("\n") == 1
    assert export.main([str(runs["runs"]["finetune"]), "--out", str(tmp_path / "o"), "--only", "adapters"]) == 2
    # A tag that does not exist, through the real command: the tags that do are named, nothing is written.
    ckpt = runs["runs"]["lora"] / "checkpoints"
    p = run([sys.executable, "-m", "trainer", "export", str(runs["runs"]["lora"]), "--tag", "step_99999999",
             "--out", str(tmp_path / "o")], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == \
        f"error: {ckpt / 'step_99999999'}: no such complete checkpoint; found: step_00000004"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_eval_runs_our_own_gated_export_but_not_edited_remote_code(exported, runs, tmp_path, capsys):
    import shutil

    from trainer.evaluation import evaluate
    from trainer.evaluation.report import final_eval

    src = exported["neutral_residues"]["dir"]
    data = [f"{d}={p['val']}" for d, p in runs["data"].items()]
    assert evaluate.main([str(src), "--data", *data, "--out", str(tmp_path / "e.json")]) == 0
    logged = final_eval(runs["runs"]["neutral_residues"])  # what training measured on the same val sets
    for d, m in final_eval(tmp_path / "e.json").items():
        assert m["bpb"] == pytest.approx(logged[d]["bpb"], rel=1e-5)
    capsys.readouterr()
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    with open(edited / "modeling_parallel_adapter.py", "a") as f:
        f.write("print('not what export wrote')\n")
    assert evaluate.main([str(edited), "--data", *data]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lm-evaluation-harness

LM_EVAL_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

MC_ITEMS = [
    {"context": "def add(a, b): return", "choices": ["a + b", "a - b", "print"], "label": 0},
    {"context": "The cat sat on the", "choices": ["mat", "integer overflow"], "label": 0},
    {"context": "for i in", "choices": ["range(3):", "the morning"], "label": 0},
    {"context": "Hello", "choices": ["world", "x"], "label": 1},
]


@pytest.mark.slow
def test_lm_eval_harness_loads_the_export_and_agrees_with_our_scoring(exported, tmp_path):
    """lm_eval.simple_evaluate(model="hf", trust_remote_code) on a gated export; same log-likelihoods as ours."""
    lm_eval = pytest.importorskip("lm_eval", reason="optional: pip install -r requirements-optional.txt")
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluation.mc import build_requests, load_items, metrics, score_requests

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in MC_ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    hf_dir = exported["neutral_residues"]["dir"]
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32,add_bos_token=True",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), num_fewshot=0,
        batch_size=2, device="cpu", log_samples=True)
    theirs = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"]["tiny_mc"]}

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    items = load_items(data)
    requests = build_requests(items, AutoTokenizer.from_pretrained(hf_dir))
    ll = score_requests(lambda ids: model(input_ids=ids).logits, requests, 4, "cpu", 64)
    ours = [[ll[i].item() for i, r in enumerate(requests) if r.item == k] for k in range(len(items))]
    for k in range(len(items)):
        assert theirs[k] == pytest.approx(ours[k], abs=1e-4)
    m = metrics(items, requests, ll)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(m["acc"])
    assert res["results"]["tiny_mc"]["acc_norm,none"] == pytest.approx(m["acc_norm"])


# ----------------------------------------------------------------------------- ZeRO-3, 2 ranks


def zero3_worker(out: Path, stage: int, backbone: Path) -> None:
    """Load + extend (under zero.Init for stage 3), one optimizer step on a fixed batch, save adapters.

    zero.Init initialises new params differently from a plain build, so the adapters
    are overwritten with seeded values (through GatheredParameters, before the
    optimizer copies them) and the backbone comes from a saved dir. The global batch
    (4 rows) is laid out as (accumulation, rank, micro) so 1 and 2 ranks see the same
    micro batches and take the same step.
    """
    import deepspeed

    from mds_fixtures import tiny_run_config
    from trainer.engine import dist
    from trainer.export.adapters_io import save_adapters
    from trainer.config import load_config
    from trainer.engine.ds_config import build_ds_config
    from trainer.method.extend import gathered, set_domain, trainable_named_parameters
    from trainer.method.losses import local_loss
    from trainer.engine.model import build_model
    from trainer.engine.perplexity import token_nll
    from trainer.engine.rng import seed_everything

    world = dist.init_distributed()
    spec = tiny_run_config(out, {"en": {}, "code": {}}, "neutral_residues", global_batch_size=4, micro_batch_size=2)
    spec["deepspeed"]["config"] = f"ds_configs/zero{stage}.json"
    spec["model"] = {"path": str(backbone)}
    cfg = load_config(data=spec)
    ds = build_ds_config(cfg, world.world_size, on_gpu=False)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny params
    seed_everything(0)
    model, _keep, _ = build_model(cfg, ds, zero3=stage == 3)
    params = [p for _, p in trainable_named_parameters(model)]
    gen = torch.Generator().manual_seed(7)
    for p in params:
        with gathered([p], modifier_rank=0), torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    if stage == 3:
        assert all(p.numel() == 0 for p in params), "ZeRO-3 did not partition the adapters"
    accum = ds["gradient_accumulation_steps"]
    rows = random_batch(4, 16, seed=3).view(accum, world.world_size, 2, 16)
    original = torch.tensor([[True], [False]])
    for k in range(accum):
        set_domain(model, original)
        ids = rows[k, world.rank]
        lm = token_nll(engine(input_ids=ids).logits, ids).mean()
        local, _ = local_loss(model, cfg.method)
        engine.backward(lm + local)
        engine.step()
    save_adapters(engine.module, cfg.method, out / "adapters", base_model="config")
    engine.save_checkpoint(str(out / "ckpt"), tag="t", exclude_frozen_parameters=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_adapters_only_file_under_zero3_two_ranks_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    from trainer.export.export import trained_state

    from trained_runs import save_backbone

    backbone = str(save_backbone(tmp_path / "backbone"))
    script = str(Path(__file__).resolve())
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), script, "zero3", str(tmp_path / "z3"), backbone])
    run([sys.executable, script, "zero2", str(tmp_path / "single"), backbone])
    z3 = load_file(str(tmp_path / "z3" / "adapters" / "adapters.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapters" / "adapters.safetensors"))
    assert set(z3) == set(single) and len(z3) == 2 * 4  # 2 layers x (w_g, w_i, w_o, w_b)
    for name in single:
        assert z3[name].shape == single[name].shape and z3[name].numel() > 0, name
        torch.testing.assert_close(z3[name], single[name], atol=1e-6, rtol=1e-5)
    cfg3 = json.loads((tmp_path / "z3" / "adapters" / "adapter_config.json").read_text())
    assert cfg3["trainable_params"] == sum(t.numel() for t in single.values())
    # The export path (zero_to_fp32 over the 2-rank ZeRO-3 checkpoint) gives the same tensors.
    merged = trained_state(tmp_path / "z3" / "ckpt", "t")
    assert set(merged) == set(z3)
    for name in z3:
        torch.testing.assert_close(merged[name], z3[name], atol=0, rtol=0)


if __name__ == "__main__":  # torchrun tests/test_export.py zero3|zero2 OUT
    os.chdir(ROOT)
    zero3_worker(Path(sys.argv[2]), 3 if sys.argv[1] == "zero3" else 2, Path(sys.argv[3]))
