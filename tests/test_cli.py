"""The `vegalm` command line as a user meets it: help texts, no-argument behaviour, one-line errors.

Every (sub)command is found by walking the real parser, so a command added later is checked too.
Help and in-process errors run `vegalm.cli.main`; the stderr/exit-status checks start real processes
(`python -m vegalm.cli`, ~3 s each).

    .venv/bin/python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vegalm.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_LINE = re.compile(r"^\s*examples?:", re.IGNORECASE | re.MULTILINE)


def command_paths() -> list[tuple[str, ...]]:
    """Every subcommand path of the parser: ("pretrain",), ("tokenizer",), ("tokenizer", "train"), ..."""
    out: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((*prefix, name))
                    walk(sub, (*prefix, name))

    walk(build_parser(), ())
    return out


COMMANDS = command_paths()


def vegalm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "vegalm.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def test_the_main_commands_are_registered():
    top = {p[0] for p in COMMANDS}
    assert {"tokenizer", "pretrain", "finetune", "glue", "run", "model-info"} <= top, top
    assert ("tokenizer", "train") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_exits_0_with_an_example(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: vegalm {' '.join(path)}"), text[:200]
    assert EXAMPLE_LINE.search(text), f"`vegalm {' '.join(path)} --help` has no example line:\n{text}"
    # ...and an actual invocation of this command somewhere after the usage line
    body = text.split("\n", 2)[-1]
    assert f"vegalm {' '.join(path)}" in body or f"-m vegalm.cli {' '.join(path)}" in body, text


def test_no_arguments_prints_help():
    proc = vegalm()
    assert proc.returncode == 2  # nothing to do: a usage error, like argparse's own
    assert proc.stdout.startswith("usage: vegalm")
    for name in ("pretrain", "finetune", "glue", "run", "tokenizer"):
        assert name in proc.stdout
    assert "Traceback" not in proc.stderr


def test_top_level_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--debug" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrian"])
    assert exc.value.code == 2
    assert "invalid choice: 'pretrian'" in capsys.readouterr().err


def test_vega_error_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = vegalm("finetune", "--task", "rte", "--model", str(missing), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()], proc.stderr  # nothing else
    assert len(errors) == 1 and f"model={missing}: no such model directory" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = vegalm("--debug", "finetune", "--task", "rte", "--model", str(missing), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "VegaError" in proc.stderr and f"model={missing}: no such model directory" in proc.stderr
    assert "resolve_model_dir" in proc.stderr  # the frames are there


def test_in_process_vega_error_and_debug(tmp_path, capsys):
    from vegalm.errors import VegaError

    argv = ["pretrain", "--recipe", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: recipe not found: {tmp_path / 'missing.yaml'}"
    with pytest.raises(VegaError, match="recipe not found"):
        main(["--debug", *argv])


def test_ctrl_c_prints_one_word_and_exits_130(monkeypatch, capsys):
    import vegalm.pipeline

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(vegalm.pipeline, "_run", interrupted)
    assert main(["run", "--recipe", "recipes/smoke.yaml", "--out", "unused"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"


def test_model_info_runs(capsys):
    assert main(["model-info", "--size", "vega-1.3b"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vega-1.3b: 48 layers, hidden 1536, 24 heads")
    assert "M non-embedding" in out
    assert "memory per rank, world size 1" in out and "total" in out


def _gib(out: str, line: str) -> float:
    row = next(ln for ln in out.splitlines() if ln.strip().startswith(line))
    return float(row.split()[-2])


def test_model_info_world_size_divides_the_sharded_memory(capsys):
    assert main(["model-info", "--size", "vega-1.3b", "--world-size", "1"]) == 0
    one = capsys.readouterr().out
    assert main(["model-info", "--size", "vega-1.3b", "--world-size", "8"]) == 0
    eight = capsys.readouterr().out
    for line in ("parameters (fp32 shard)", "gradients", "AdamW"):
        assert _gib(eight, line) == pytest.approx(_gib(one, line) / 8, abs=0.01)
    assert _gib(eight, "activations") == _gib(one, "activations")  # the local batch is the same
    assert main(["model-info", "--size", "vega-1.3b", "--world-size", "8", "--activation-checkpointing"]) == 0
    ckpt = capsys.readouterr().out
    assert _gib(ckpt, "activations (checkpointed)") < _gib(eight, "activations") / 10


@pytest.mark.parametrize("flags", [["--world-size", "0"], ["--batch-size", "0"], ["--dtype", "fp16"],
                                   ["--head", "cls"], ["--size", "huge"]])
def test_model_info_bad_flags_exit_2_in_one_line(capsys, flags):
    assert main(["model-info", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
