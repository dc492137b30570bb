"""The CLI as a new user meets it: no silent overwrite, no traceback, no silently ignored value.

One test per finding of the reliability pass, through ``mambatrim.cli.main`` (or a subprocess where a signal
is needed): the exit code, the one-line message, and no file changed where a failure must change nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from mambatrim.cli import build_parser, main
from mambatrim.commands.train import training_config

ROOT = Path(__file__).parents[1]
TINY = ["--model-opt", "embed_dim=16", "--model-opt", "depth=2", "--input-size", "8", "--batch-size", "128",
        "--device", "cpu", "--no-progress", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line ``mambatrim COMMAND: error: ...`` holding every needle."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"mambatrim {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- data loss
def test_1_second_run_into_a_run_folder_is_refused_then_overwrite_and_new_run(tmp_path, capsys):
    out = tmp_path / "R"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--output-dir", str(out))[0] == 0
    before = snapshot(out)
    assert {"best.pth", "last.pth", "metrics.jsonl", "config.yaml", "summary.json"} <= set(before)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--lr", "1e-5", "--seed", "1",
                           "--output-dir", str(out))
    assert_one_line_error(code, err, "train", str(out), "already holds a run", "--overwrite", "--resume")
    assert snapshot(out) == before  # nothing replaced, nothing appended

    code, _, _ = run_cli(capsys, "train", *TINY, "--epochs", "1", "--seed", "1", "--new-run", "--output-dir", str(out))
    assert code == 0 and snapshot(out) == before
    assert (tmp_path / "R-2" / "best.pth").exists()
    assert json.loads((tmp_path / "R-2" / "summary.json").read_text())["output_dir"] == str(tmp_path / "R-2")

    code, out_text, _ = run_cli(capsys, "train", *TINY, "--epochs", "1", "--seed", "1", "--overwrite",
                                "--output-dir", str(out))
    assert code == 0 and "deleting the previous run's" in out_text
    new_steps = metrics_steps(out)
    assert new_steps == metrics_steps(tmp_path / "R-2")  # only the new run's records: never two runs mixed
    assert (out / "best.pth").read_bytes() != before["best.pth"]


def test_2_a_failing_train_writes_nothing(tmp_path, capsys):
    out = tmp_path / "R"
    out.mkdir()
    (out / "config.yaml").write_text("a previous run's config\n")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-path", str(tmp_path / "nonexistent"),
                           "--output-dir", str(out), "--overwrite")
    assert_one_line_error(code, err, "train", "does not exist")
    assert snapshot(out) == {"config.yaml": b"a previous run's config\n"}
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "train", *TINY, "--data-path", str(tmp_path / "nonexistent"),
                           "--output-dir", str(fresh))
    assert code == 2 and not fresh.exists()


# ------------------------------------------------------------------------------------------------ resume
def test_3_resume_with_the_printed_hint_alone(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"  # a recipe the resumed command does not repeat
    recipe.write_text("batch_size: 64\nmodel_kwargs: {embed_dim: 16, depth: 2, patch_size: 4, stride: 4}\ninput_size: 8\n"
                      "num_workers: 0\ndevice: cpu\nprogress: false\nepochs: 2\n")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(capsys, "train", "--config", str(recipe), "--output-dir", str(full))[0] == 0
    code, out, _ = run_cli(capsys, "train", "--config", str(recipe), "--output-dir", str(cut),
                           "--stop-after-steps", "5")
    assert code == 0
    hint = out.split("continue with ")[1].split()  # ['--resume', PATH]
    code, _, err = run_cli(capsys, "train", *hint, "--lr", "0.1", "--seed", "3")
    line = assert_one_line_error(code, err, "train", "cannot resume", "lr=0.1", "seed=3")
    assert "batch_size" not in line  # only what differs is named
    code, out, _ = run_cli(capsys, "train", *hint, "--stop-after-steps", "1000")  # a free option may change
    assert code == 0 and "stop_after_steps=1000" in out
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["top1"] == pytest.approx(json.loads((full / "summary.json").read_text())["top1"])
    assert resumed["global_step"] == 2 * 22


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_4_an_interrupted_run_exits_non_zero_after_its_checkpoint(tmp_path, sig, code):
    out = tmp_path / "R"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mambatrim", "train", *TINY, "--epochs", "1000",
                             "--output-dir", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "continue with --resume" in stdout and (out / "last.pth").exists()
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------- tracebacks and messages
METHOD_OPTION_CASES = [("rmeeto", "rati=0.3"), ("top", "kep=0.8"), ("prune_norm", "kep=0.8"),
                       ("dyvm", "keep_ratoi=0.7")]


@pytest.mark.parametrize("method, option", METHOD_OPTION_CASES)
@pytest.mark.parametrize("command", ["flops", "bench"])
def test_5_unknown_method_option_one_line_naming_valid_options(capsys, command, method, option):
    extra = ["--device", "cpu", "--iters", "1", "--warmup", "0", "--batch-size", "1"] if command == "bench" else []
    code, _, err = run_cli(capsys, command, "vim_tiny_patch16_224", "--img-size", "32", *extra,
                           "--method", method, "--method-opt", option)
    assert_one_line_error(code, err, command, option.split("=")[0], "valid options:")


def test_5_unknown_method_option_in_train_writes_nothing(tmp_path, capsys):
    out = tmp_path / "R"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--method", "rmeeto",
                           "--method-opt", "rati=0.3", "--output-dir", str(out))
    assert_one_line_error(code, err, "train", "rati", "valid options:")
    assert not out.exists()


def test_5_misspelt_method_value_one_line(capsys):
    code, _, err = run_cli(capsys, "flops", "vim_tiny_patch16_224", "--method", "rmeeto", "--method-opt", "ratio=031")
    assert_one_line_error(code, err, "flops", "ratio")  # YAML reads 031 as octal 25: refused with its range


def garbage_files(tmp_path: Path) -> list[Path]:
    rng = torch.Generator().manual_seed(0)
    raw = tmp_path / "random.pth"
    raw.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()))
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights\n" * 20)
    return [raw, text]


def test_6_garbage_checkpoints_one_line(tmp_path, capsys):
    for path in garbage_files(tmp_path):
        code, _, err = run_cli(capsys, "eval", "--checkpoint", str(path), "--no-throughput")
        line = assert_one_line_error(code, err, "eval", f"not a PyTorch checkpoint (or corrupt): {path}")
        assert "weights_only" not in line


def test_7_triton_backend_without_a_gpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run_cli(capsys, "bench", "vim_tiny_patch16_224", "--device", "cpu", "--backend", "triton")
    assert_one_line_error(code, err, "bench", "the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1")


def test_8_zip_of_loose_images_says_what_it_found(tmp_path, capsys):
    from PIL import Image

    archive = tmp_path / "loose.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(5):
            Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
            zf.write(tmp_path / f"{i}.png", f"{i}.png")
    code, _, err = run_cli(capsys, "train", "--data-path", str(archive), "--output-dir", str(tmp_path / "R"))
    assert_one_line_error(code, err, "train", "5 loose images (0.png, 1.png, 2.png, ...)",
                          "expected train/ and val/ (or test/)")
    assert not (tmp_path / "R").exists()


# ----------------------------------------------------------------------------------- ignored values
@pytest.mark.parametrize("argv, needle", [
    (["flops", "vim_tiny_patch16_224", "--img-size", "0"], "--img-size must be an integer >= 1, got 0"),
    (["flops", "vim_tiny_patch16_224", "--img-size", "-16"], "--img-size must be an integer >= 1, got -16"),
    (["flops", "vim_tiny_patch16_224", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["bench", "vim_tiny_patch16_224", "--device", "cpu", "--batch-size", "0"], "--batch-size must be an integer"),
    (["bench", "vim_tiny_patch16_224", "--device", "cpu", "--iters", "0"], "--iters must be an integer >= 1"),
    (["bench", "vim_tiny_patch16_224", "--device", "cpu", "--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["train", "--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    (["train", "--lr", "0"], "lr must be a number > 0, got 0.0"),
    (["train", "--smoothing", "1.5"], "smoothing must be a number in [0, 1], got 1.5"),
    (["train", "--set", "crop_pct=0"], "crop_pct must be a fraction in (0, 1], got 0"),
    (["eval", "--bench-batch", "0"], "--bench-batch must be an integer >= 1, got 0"),
    (["demo", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_9_10_zero_negative_and_out_of_range_values_are_refused(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, argv[0], needle)
    assert list(tmp_path.iterdir()) == []


def test_11_rmeeto_r_out_of_range_is_refused(capsys):
    code, _, err = run_cli(capsys, "flops", "vim_tiny_patch16_224", "--method", "rmeeto", "--method-opt", "r=1000")
    assert_one_line_error(code, err, "flops", "1000")


# --------------------------------------------------------------------------------------------- help
def test_12_the_default_train_run_is_what_help_says(capsys):
    from mambatrim.engine.build import build_from_config

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    cfg = training_config(build_parser().parse_args(["train"]))
    capsys.readouterr()
    model = build_from_config(cfg, 10, 1, 16)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert f"{cfg.epochs} epochs" in help_text and cfg.data_path == "digits"
    assert f"{params_m:.2f} M parameters" in help_text
    full = training_config(build_parser().parse_args(["train", "--model", "vim_tiny_patch16_224"]))
    assert full.epochs == 300 and "300 epochs" in help_text  # the full recipe, as the help also says


def test_13_eval_help_shows_only_evaluation_options():
    parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {"--checkpoint", "--method", "--data-path", "--no-throughput", "--bench-batch"} <= flags
    assert not flags & {"--epochs", "--lr", "--mixup", "--teacher", "--resume", "--output-dir", "--overwrite"}
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_14_unknown_method_name_lists_the_known_ones(capsys):
    from mambatrim.reduce import METHODS

    code, _, err = run_cli(capsys, "flops", "vim_tiny_patch16_224", "--method", "rmeto")
    assert_one_line_error(code, err, "flops", "rmeto", *sorted(METHODS))
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "an unknown method name or method option gets the valid ones listed" in readme  # as it does


def test_15_flops_prints_its_convention_and_the_readme_says_how_to_get_the_published_figure(capsys):
    code, out, _ = run_cli(capsys, "flops", "vim_tiny_patch16_224", "--img-size", "32", "--method", "dyvm")
    assert code == 0
    note = out.strip().splitlines()[-1]
    assert note.startswith("convention:") and "'paper' counts the scan paths" in note and "'full' counts" in note
    assert "untrained predictors" in note
    assert "dyvm.count_flops(model, block_ratio=0.8)" in (ROOT / "README.md").read_text()


def test_16_readme_says_how_to_install_the_cpu_build_without_longer_commands():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up")[1].split("\n## ")[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup
    commands = [line for line in setup.splitlines() if line.startswith("python3 -m venv")]
    assert commands == ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/mambatrim demo",
                        'python3 -m venv .venv && .venv/bin/pip install -e ".[dev,gpu,video]" && .venv/bin/python -m pytest -q']
