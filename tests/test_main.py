"""`python -m trainer`: the dispatcher's refusals and the per-environment JIT-extension dir."""
import hashlib
import os
import sys

from trainer import __main__ as cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)


def test_unknown_command_exits_2_and_names_it(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_extensions_dir_is_per_environment_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cli._own_extensions_dir()
    chosen = os.environ["TORCH_EXTENSIONS_DIR"]
    assert chosen.startswith(str(tmp_path / ".cache" / "torch_extensions"))
    assert chosen.endswith(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/scratch/mine")
    cli._own_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/scratch/mine"
