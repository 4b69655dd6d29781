"""Every `vegalm …` example a user can copy runs: each line from README.md, docs/*.md, the Makefile and every `--help`
text (all subcommands, found by walking the real parser) must parse with argparse, and its `key=value`
overrides must fit the dataclasses of that command (types, unknown keys and value checks, as at load time).

Synopsis notation is allowed in README's command table: `[…]` groups are optional and dropped before parsing.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_examples.py -q
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from vegalm.cli import build_parser
from vegalm.config import apply_overrides, from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"(?:^|[\s`$(/])(?:vegalm|-m vegalm\.cli)\s+([a-z][a-z-]*\b.*)")


def _help_texts() -> dict[str, str]:
    texts = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        texts[name] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")

    walk(build_parser(), "vegalm")
    return texts


def _lines(text: str) -> list[str]:
    """Text lines with shell continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _code(markdown: str) -> str:
    """The code of a prose page: its fenced blocks, and its inline spans that start a command (docs say "vegalm
    writes ..." in prose, which is no example)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)
    spans = re.findall(r"`((?:vegalm|torchrun|accelerate) [^`]*)`", markdown)
    return "\n".join(blocks + spans)


def examples() -> list[tuple[str, str]]:
    """(where, command line after `vegalm`) for every example found."""
    sources = {"README.md": (REPO / "README.md").read_text(encoding="utf-8"),
               "Makefile": (REPO / "Makefile").read_text(encoding="utf-8"),
               **{f"docs/{p.name}": _code(p.read_text(encoding="utf-8")) for p in sorted((REPO / "docs").glob("*.md"))},
               **{f"`{k} --help`": v.split("\n\n", 1)[-1] for k, v in _help_texts().items()}}  # usage block aside
    found = []
    for where, text in sources.items():
        for line in _lines(text):
            for span in re.findall(r"`([^`]*vegalm[^`]*)`", line) or [line]:  # inline code, else the line
                m = COMMAND.search(span)
                if m and " " in m.group(1).strip():  # `vegalm pretrain` alone names a command, it is no example
                    cmd = re.sub(r"\s+#\s.*$", "", m.group(1))  # a trailing shell comment
                    found.append((where, re.sub(r"\s*\[[^\]]*\]", "", cmd).strip()))
    return sorted(set(found))


EXAMPLES = examples()
CONFIG_OF = {"pretrain": "RecipeConfig", "run": "RecipeConfig", "tapt": "TaptConfig"}  # others: FinetuneConfig


def _check_overrides(command: str, overrides: list[str], tricks: list[str]) -> None:
    kind = CONFIG_OF.get(command, "FinetuneConfig")
    if kind == "RecipeConfig":
        from vegalm.pretrain.run import RecipeConfig

        load_config(RecipeConfig, None, overrides)
    elif kind == "TaptConfig":
        from vegalm.pretrain.tapt import TaptConfig

        from_dict(TaptConfig, apply_overrides({"task": "rte", "model": "m", "out": "o"}, overrides))
    else:
        from vegalm.finetune.config import FinetuneConfig

        fixed = {"task": "rte", "model": "m", "out": "o", "tricks": tricks}  # ablate enables its --tricks per combo
        from_dict(FinetuneConfig, apply_overrides(fixed, overrides))


def test_examples_are_found_everywhere():
    wheres = {w for w, _ in EXAMPLES}
    assert "README.md" in wheres and "Makefile" in wheres and "`vegalm --help`" in wheres
    commands = {c.split()[0] for _, c in EXAMPLES}
    assert {"pretrain", "run", "finetune", "glue", "ablate", "tokenizer", "tapt", "model-info"} <= commands, commands
    assert any("=" in c for _, c in EXAMPLES if c.startswith("pretrain"))  # overrides are among them


@pytest.mark.parametrize("where, line", EXAMPLES, ids=[f"{w}: {c[:60]}" for w, c in EXAMPLES])
def test_example_parses_and_its_overrides_fit(where, line):
    argv = shlex.split(line)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):  # a pointer to a help text: it printed, fine
            return
        pytest.fail(f"{where}: `vegalm {line}` is rejected by argparse (exit {e.code})")
    overrides = getattr(args, "overrides", None) or getattr(args, "settings", None) or []
    tricks = [t for t in (getattr(args, "tricks", None) or "").split(",") if t not in ("", "vanilla", "all")]
    _check_overrides(args.command, [o for o in overrides if "=" in o], tricks)
    assert all("=" in o for o in overrides), f"{where}: `vegalm {line}`: {overrides} are not key=value"


def override_spans() -> list[str]:
    """README's inline override examples (`phase1.train.lr=3e-4 model.num_hidden_layers=2`, `grad_accum=4`)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    token = r"[a-z_][a-z0-9_.]*=[^\s`]+"
    prose = {"legacy=False"}  # transformers' DeBERTa-v2 head flag, quoted in the text: no vegalm setting
    return sorted(set(re.findall(rf"`({token}(?: {token})*)`", text)) - prose)


@pytest.mark.parametrize("span", override_spans())
def test_readme_override_examples_fit(span):
    import dataclasses

    from vegalm.pretrain.run import RecipeConfig

    overrides = span.split()
    sections = {f.name for f in dataclasses.fields(RecipeConfig)}
    command = "pretrain" if overrides[0].split(".")[0] in sections else "finetune"
    _check_overrides(command, overrides, [])


def test_readme_has_override_examples():
    assert "phase1.train.lr=3e-4 model.num_hidden_layers=2" in override_spans()
