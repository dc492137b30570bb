"""mambatrim search: candidate settings timed by the comparison harness, Pareto front, the choice rules."""
from __future__ import annotations

import pytest

from mambatrim._yaml import load_yaml_text
from mambatrim.cli import main
from mambatrim.engine.search import _choose, _dominates, _meets, method_opt_line, parse_target, search, yaml_lines
from mambatrim.reduce import parse_method_options


def row(name: str, speedup: float, gflops: float, top1: float | None = None) -> dict:
    r = {"config": name, "speedup": speedup, "img_per_s": 100 * speedup, "gflops": {"paper": gflops},
         "slower_than_dense": speedup < 1.0}
    if top1 is not None:
        r.update(top1=top1, top1_drop=80.0 - top1)
    return r


@pytest.mark.parametrize("text", ["speed=1.3", "speedup=fast", "speedup=0", "gflops=-1", "speedup"])
def test_bad_targets_are_one_line_errors(text: str) -> None:
    with pytest.raises(ValueError, match="speedup=NUMBER, img_per_s=NUMBER, gflops=NUMBER, max_drop=NUMBER"):
        parse_target(text)


def test_the_mildest_setting_that_meets_the_target_is_chosen_and_slower_ones_never() -> None:
    rows = [row("a", 0.9, 4.0), row("b", 1.35, 3.0), row("c", 1.8, 2.0)]
    eligible = [r for r in rows if _meets(r, "speedup", 1.3) and not r["slower_than_dense"]]
    assert [r["config"] for r in eligible] == ["b", "c"]
    assert _choose(eligible, "speedup")["config"] == "b"  # most GFLOPs kept among those fast enough
    slow = row("slow", 0.8, 1.0)  # far fewer GFLOPs, but slower than dense here
    assert _meets(slow, "gflops", 2.5) and slow["slower_than_dense"]


def test_with_accuracy_the_best_top1_wins_and_max_drop_picks_the_fastest() -> None:
    rows = [row("a", 1.4, 3.0, top1=79.0), row("b", 1.5, 3.5, top1=79.5), row("c", 2.0, 2.0, top1=76.0)]
    assert _choose([r for r in rows if _meets(r, "speedup", 1.3)], "speedup")["config"] == "b"
    assert _choose([r for r in rows if _meets(r, "max_drop", 1.0)], "max_drop")["config"] == "b"
    assert _dominates(rows[1], rows[0]) and not _dominates(rows[2], rows[1])


def test_the_chosen_line_and_yaml_read_back_as_the_options() -> None:
    options = {"keep": 0.8, "block_ratio": None, "layers": [1, 2]}
    line = method_opt_line("dyvm", options)
    items = line.split("--method-opt ")[1:]
    assert line.startswith("--method dyvm ") and parse_method_options([i.strip() for i in items]) == options
    assert load_yaml_text(yaml_lines("dyvm", options)) == {"method": "dyvm", "method_opts": options}


def test_a_search_on_the_cpu_flags_and_chooses(tmp_path) -> None:
    result = search("vim_tiny_patch16_224", "rmeeto", "speedup=0.01", [{"ratio": 0.1}, {"ratio": 0.2}],
                    device="cpu", img_size=32, batch_size=2, dtype="fp32", rounds=1, iters=1, warmup=0,
                    model_kwargs={"embed_dim": 16, "depth": 4, "patch_size": 4, "stride": 4})
    rows = result["rows"]
    assert [r["options"] for r in rows] == [{"ratio": 0.1}, {"ratio": 0.2}]
    assert rows[0]["gflops"]["paper"] > rows[1]["gflops"]["paper"]
    fast_enough = [r for r in rows if r["speedup"] >= 1.0]
    assert result["chosen"] == (max(fast_enough, key=lambda r: r["gflops"]["paper"])["config"]
                                if fast_enough else None)


def test_the_command_refuses_bad_input_in_one_line(capsys) -> None:
    assert main(["search", "vim_tiny_patch16_224", "--method", "rmeeto", "--target", "fast"]) == 2
    assert "target 'fast'" in capsys.readouterr().err
    assert main(["search", "vim_tiny_patch16_224", "--method", "tome", "--target", "speedup=1.3",
                 "--device", "cpu"]) == 2
    assert "no default candidate settings for method 'tome'" in capsys.readouterr().err
    assert main(["search", "vim_tiny_patch16_224", "--method", "rmeeto", "--target", "speedup=1.3",
                 "--data-path", "digits"]) == 2
    assert "--data-path needs --checkpoint" in capsys.readouterr().err
