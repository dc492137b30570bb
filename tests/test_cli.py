"""CLI smoke tests: models, flops, info, bench (tiny settings), --help everywhere, unknown names."""
from __future__ import annotations

import json

import pytest

from mambatrim.cli import main


def test_models_lists_configs_with_flops(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vim_tiny_patch16_224" in out and "vim_base_patch16_224" in out
    tiny = next(line for line in out.splitlines() if line.startswith("vim_tiny_patch16_224 "))
    assert tiny.split()[1:] == ["7.15", "1.45", "1.82"]


def test_flops_both_conventions_and_json(capsys):
    assert main(["flops", "vim_small_patch16_224"]) == 0
    assert "GFLOPs paper 5.08, full 5.91" in capsys.readouterr().out
    assert main(["flops", "vim_tiny_patch16_224", "--convention", "paper"]) == 0
    out = capsys.readouterr().out
    assert "paper 1.45" in out and "full" not in out
    assert main(["flops", "vim_tiny_patch16_224", "--img-size", "384", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["img_size"] == [384, 384] and report["gflops"]["paper"] > 4


def test_unknown_model_suggests_close_matches(capsys):
    assert main(["flops", "vim_small_patch16"]) == 2
    assert "Did you mean: vim_small_patch16_224" in capsys.readouterr().err


def test_info_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scan_backends"]["ref"] == "ok" and info["scan_backends"]["torch"] == "ok"
    assert "triton" in info["scan_backends"]


def test_bench_writes_json(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    argv = ["bench", "vim_tiny_patch16_224", "--device", "cpu", "--batch-size", "1", "--img-size", "32",
            "--iters", "2", "--warmup", "0", "--backend", "torch", "--json-out", str(out_file)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["img_per_s"] > 0 and result["iters"] == 2 and result["scan_backend"] == "torch"
    assert json.loads(out_file.read_text())["model"] == "vim_tiny_patch16_224"


@pytest.mark.parametrize("command", ["models", "flops", "bench", "info"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"mambatrim {command}" in capsys.readouterr().out.split("examples:")[1]
