"""benchmarks/cifar10/runs_table.py: a protocol table from training-run folders and ``mambatrim eval`` outputs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10" / "runs_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("runs_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, top1: float, gflops: float, finetune: bool) -> Path:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(
        {"top1": top1, "gflops": gflops, "params": 2_000_000, "model": "m", "method": None, "epochs_done": 4,
         "lr": 2e-4}))
    config = "model: m\nmethod_opts: {keep: 0.5}\n" + ("finetune: x.pth\n" if finetune else "")
    (folder / "config.yaml").write_text(config)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "train", "epoch": 0, "loss": 1.0}, {"kind": "eval", "epoch": 2, "top1": top1 - 3},
        {"kind": "eval", "epoch": 4, "top1": top1}]))
    return folder


def test_rows_from_runs_and_eval_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = fake_run(tmp_path / "dense", 80.0, 1.0, finetune=False)
    tuned = fake_run(tmp_path / "tuned", 79.5, 0.8, finetune=True)
    evaluated = tmp_path / "eval.json"
    evaluated.write_text("loading checkpoint\n" + json.dumps(
        {"model": "m", "method": "stage_merge", "method_opts": {"keep": 0.7}, "top1": 78.0, "gflops": 0.9,
         "params": 2_000_000}, indent=2) + "\nlog after\n")
    monkeypatch.setattr(sys, "argv", ["runs_table", "--name", "t", "--out", str(tmp_path), "--title", "T",
                                      "--dense", "dense", "--row", f"dense={dense}", "--row", f"a=b={tuned}",
                                      "--row", f"training-free={evaluated}", "--note", "n1"])
    load_script().main()
    record = json.loads((tmp_path / "t.json").read_text())
    rows = record["rows"]
    assert list(rows) == ["dense", "a=b", "training-free"]  # labels may hold '='; the path follows the last
    assert rows["a=b"]["drop"] == pytest.approx(-0.5) and rows["a=b"]["flops_ratio"] == pytest.approx(1.25)
    assert rows["a=b"]["finetune"] and rows["a=b"]["method_opts"] == {"keep": 0.5}
    assert rows["a=b"]["eval_curve"] == [{"epoch": 2, "top1": 76.5}, {"epoch": 4, "top1": 79.5}]
    assert rows["training-free"]["drop"] == pytest.approx(-2.0) and rows["training-free"]["epochs"] == 0
    table = (tmp_path / "t.md").read_text()
    assert "| a=b | 79.50 | -0.50 | 0.800 | 1.250x | 4 ep, lr 0.0002, fine-tuned from dense |" in table
    assert "none (training-free)" in table and table.rstrip().endswith("n1")


def test_a_run_without_recipe_fields_still_renders(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "bare", 70.0, 1.0, finetune=False)
    summary = json.loads((run / "summary.json").read_text())
    del summary["lr"], summary["epochs_done"]
    (run / "summary.json").write_text(json.dumps(summary))
    script = load_script()
    row = script.load_row(run)
    row.update(drop=0.0, flops_ratio=1.0)
    assert "| bare | 70.00 | +0.00 | 1.000 | 1.000x | - | 2.00 |" in script.to_markdown("T", {"bare": row}, [])


def test_bad_rows_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    dense = fake_run(tmp_path / "dense", 80.0, 1.0, finetune=False)
    script = load_script()
    monkeypatch.setattr(sys, "argv", ["runs_table", "--name", "t", "--out", str(tmp_path), "--title", "T",
                                      "--dense", "base", "--row", f"dense={dense}"])
    with pytest.raises(SystemExit):
        script.main()
    assert "--dense names a row label; choose one of ['dense']" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["runs_table", "--name", "t", "--out", str(tmp_path), "--title", "T",
                                      "--dense", "dense", "--row", f"dense={tmp_path / 'missing'}"])
    with pytest.raises(SystemExit):
        script.main()
    assert "neither a run folder nor an eval output" in capsys.readouterr().err
