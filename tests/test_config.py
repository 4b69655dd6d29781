"""Recipes and `key=value` overrides: YAML 1.2 scalars, duplicate keys, `base:` chains, value checks at load time
with the dotted key, "did you mean", recipe-relative paths, the typed `glue:` section, and the one-line CLI errors
(exit 2, no traceback, no file written) for each.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from _data import needs_corpus
from vegalm.config import ConfigError, from_dict, load_config, parse_override, to_dict
from vegalm.pretrain.run import RecipeConfig

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")

# spelling -> the value it means, per field type; None: refused for that type
SPELLINGS = {
    "3e-4": 3e-4, ".5e-4": 0.5e-4, "1E-5": 1e-5, "1e0": 1.0, "2.5": 2.5, "-1.5e+2": -150.0, "1": 1, "010": 10,
    "no": "no", "off": "off", "yes": "yes", "on": "on", "bf16": "bf16", "true": True, "false": False, "True": True,
}
FIELDS = {"float": "rate", "int": "count", "str": "word", "bool": "flag"}


@dataclass
class Typed:
    """One field per type, no value checks: only the parsing is under test."""

    rate: float = 0.0
    count: int = 0
    word: str = ""
    flag: bool = False
    maybe: float | None = None


ACCEPTS = {
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "int": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer(),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
}


def vegalm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "vegalm.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", sorted(FIELDS))
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("source", ["override", "recipe"])
def test_every_spelling_against_every_field_type(tmp_path, source, spelling, kind):
    name, meant = FIELDS[kind], SPELLINGS[spelling]
    if source == "override":
        recipe, overrides = None, [f"{name}={spelling}"]
    else:
        recipe, overrides = tmp_path / "r.yaml", []
        recipe.write_text(f"{name}: {spelling}\n")
    ok = ACCEPTS[kind](meant)
    try:
        got = getattr(load_config(Typed, recipe, overrides), name)
    except ConfigError as e:
        assert not ok, f"{spelling!r} for a {kind} field: {e}"
        assert name in str(e)
        return
    assert ok, f"{spelling!r} was accepted for a {kind} field as {got!r}"
    assert got == meant and type(got) is {"float": float, "int": int, "str": str, "bool": bool}[kind]


def test_special_floats_and_what_yaml_1_1_got_wrong():
    assert load_config(Typed, None, ["maybe=1e-5"]).maybe == 1e-5 and load_config(Typed, None, ["maybe=null"]).maybe is None
    assert math.isnan(parse_override("x=.nan")[1]) and parse_override("x=-.inf")[1] == -math.inf
    assert parse_override("x=2024-01-01")[1] == "2024-01-01"  # no timestamps
    assert parse_override("x=1_000")[1] == "1_000"  # YAML 1.2 has no digit separators
    assert parse_override("x=0x10")[1] == 16 and parse_override("x=null")[1] is None


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(f"base: {SMOKE}\nphase1:\n  train: {{lr: 1e-3}}\nname: x\nphase1:\n  train: {{lr: 2e-3}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(RecipeConfig, recipe)
    assert str(e.value) == f"{recipe}: duplicate key 'phase1' (lines 2 and 5)"
    nested = tmp_path / "nested.yaml"
    nested.write_text("phase1:\n  train:\n    lr: 1e-3\n    lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(lines 3 and 4\)"):
        load_config(RecipeConfig, nested)


@pytest.mark.parametrize("override, message", [
    ("phase1.train.batch_size=-4", "phase1.train.batch_size: expected >= 1, got -4"),
    ("phase1.train.max_steps=0", "phase1.train.max_steps: expected >= 1, got 0"),
    ("phase1.train.lr=.nan", "phase1.train.lr: expected a finite number >= 0, got nan"),
    ("phase2.train.lr=.inf", "phase2.train.lr: expected a finite number >= 0, got inf"),
    ("data.seq_len=0", "data.seq_len: must be >= 1, got 0"),
    ("glue.seeds=0", "glue.seeds: must be >= 1, got 0"),
    ("glue.lr=-1", "glue.lr"),
    ("glue.seed=3", "glue.seed: set by `vegalm run` itself"),
    ("phase1.train.learning_rate=1e-3", "unknown key phase1.train.learning_rate: did you mean `lr`?"),
    ("model.hidden_sise=64", "unknown key model.hidden_sise: did you mean `hidden_size`?"),
    ("glue.lrr=1e-4", "unknown key glue.lrr: did you mean `lr`?"),
    ("data.seq_len=1024", "data.seq_len: must be <= model.max_position_embeddings (512) with "
                          "model.position_biased_input=true, got 1024"),
])  # fmt: skip
def test_bad_values_fail_at_load_with_the_dotted_key(override, message):
    extra = ["model.position_biased_input=true"] if override.startswith("data.seq_len=1024") else []
    with pytest.raises(ConfigError) as e:
        load_config(RecipeConfig, SMOKE, [override, *extra])
    assert message in str(e.value) and str(e.value).startswith(SMOKE), e.value


@pytest.mark.parametrize("command", ["pretrain", "run"])
@pytest.mark.parametrize("case", ["self", "chain", "seq_len", "negative_batch"])
def test_cli_errors_are_one_line_before_any_work(tmp_path, command, case):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text({"self": "base: a.yaml\n", "chain": "base: b.yaml\n"}.get(case, f"base: {SMOKE}\n"))
    b.write_text("base: a.yaml\nname: b\n")
    overrides = {"seq_len": ["model.position_biased_input=true", "data.seq_len=2048"],
                 "negative_batch": ["phase1.train.batch_size=-4"]}.get(case, [])  # fmt: skip
    before = {p: p.read_bytes() for p in (a, b)}
    out = tmp_path / "out"
    line = one_line_error(vegalm(command, "--recipe", str(a), "--out", str(out), *overrides))
    expected = {"self": "`base:` includes a recipe that includes it (a.yaml -> a.yaml)",
                "chain": "`base:` includes a recipe that includes it (a.yaml -> b.yaml -> a.yaml)",
                "seq_len": "data.seq_len: must be <= model.max_position_embeddings (512)",
                "negative_batch": "phase1.train.batch_size: expected >= 1, got -4"}[case]  # fmt: skip
    assert expected in line, line
    assert not out.exists()
    assert {p: p.read_bytes() for p in (a, b)} == before


def test_every_recipe_loads_and_gpu_recipes_state_their_own_glue():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert {"base.yaml", "large.yaml", "vega-1.3b.yaml", "tiny.yaml", "smoke.yaml"} <= {r.name for r in recipes}
    tiny = load_config(RecipeConfig, REPO / "recipes" / "tiny.yaml").glue
    for recipe in recipes:
        cfg = load_config(RecipeConfig, recipe)
        assert from_dict(RecipeConfig, to_dict(cfg)) == cfg  # recipe.json reads back as the same config
        if recipe.name in ("base.yaml", "large.yaml", "vega-1.3b.yaml"):
            glue = cfg.glue.settings
            assert glue.get("max_train_samples") is None and "epochs" not in glue, (recipe.name, glue)
            assert cfg.glue.tasks != tiny.tasks
    assert tiny.settings["max_train_samples"] == 2000  # the CPU recipe keeps its caps


def test_glue_section_is_replaced_whole_by_a_child_recipe(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {REPO / 'recipes' / 'tiny.yaml'}\nglue: {{tasks: [rte], seeds: 2}}\n")
    glue = load_config(RecipeConfig, child).glue
    assert (glue.tasks, glue.seeds, glue.settings) == (["rte"], 2, {})


def test_paths_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello\n")
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("data:\n  corpus: ../corpus/*.txt,nowhere/x.txt\n  tokenizer: ../corpus\n")
    data = load_config(RecipeConfig, recipe).data
    assert data.corpus == f"{tmp_path}/corpus/*.txt,nowhere/x.txt"  # a part not found there stays CWD-relative
    assert data.tokenizer == str(tmp_path / "corpus")
    override = load_config(RecipeConfig, recipe, ["data.corpus=mine.txt"]).data.corpus
    assert override == "mine.txt"  # a typed path is the user's, relative to the working directory


@needs_corpus
def test_repo_recipes_find_the_corpus_from_any_working_directory(tmp_path, monkeypatch):
    import glob

    monkeypatch.chdir(tmp_path)
    for name in ("tiny.yaml", "smoke.yaml", "base.yaml"):
        cfg = load_config(RecipeConfig, REPO / "recipes" / name)
        assert glob.glob(cfg.data.corpus), (name, cfg.data.corpus)
        if cfg.baseline:
            assert Path(cfg.baseline).is_file()


def test_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    from vegalm.outdir import lock_dir

    out = tmp_path / "out"
    with lock_dir(out):  # this process holds it, as a running `vegalm pretrain` would
        before = sorted(p.name for p in out.iterdir())
        for command in ("pretrain", "run"):
            line = one_line_error(vegalm(command, "--recipe", SMOKE, "--out", str(out)))
            assert f"pid {os.getpid()}" in line and str(out) in line, line
        assert sorted(p.name for p in out.iterdir()) == before


def test_parser_builds_without_torch_and_debug_goes_anywhere(tmp_path):
    code = ("import sys, vegalm.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))  # fmt: skip
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    late = vegalm("pretrain", "--recipe", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"), "--debug")
    assert late.returncode == 1 and "Traceback" in late.stderr and "recipe not found" in late.stderr


def test_bare_run_says_what_it_is_about_to_run(monkeypatch, capsys):
    import vegalm.pipeline
    from vegalm.cli import main

    seen = {}
    monkeypatch.setattr(vegalm.pipeline, "run_pipeline", lambda *a, **kw: seen.update(args=a, kw=kw))
    monkeypatch.chdir(REPO)
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "recipe recipes/tiny.yaml -> runs/demo" in out and "phase1: " in out and "seed(s)" in out, out
    assert seen["args"][:2] == ("recipes/tiny.yaml", "runs/demo") and seen["kw"]["retrain"] is False
    assert seen["kw"]["jobs"] == min(2, os.cpu_count() or 1)  # both pretrainings side by side on 2+ cores
