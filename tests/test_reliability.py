"""Reliability of the main job through the `vegalm` command line: kill -9 and resume of pretraining, a kill
inside a checkpoint write, bad inputs (one `error:` line, exit 2, nothing good overwritten), NaN losses, and a
scan of src/ for unpickling loads.

Pretraining runs use recipes/smoke.yaml shrunk by overrides (bench/kill_resume.py: a 200-article corpus, a
400-piece tokenizer shared by every run, 2 x 32 encoder, 8 + 4 steps, a checkpoint every 2 steps). The kill
tests, the NaN tests and the dirty-corpus run start real `python -m vegalm.cli` processes with one thread, so
their weights compare bit for bit with the reference; the other error tests call `vegalm.cli.main` in this
process (the same code path, milliseconds each).

    .venv/bin/python -m pytest tests/test_reliability.py -q -m "not slow"   # ~60-75 s on 2 shared cores
    .venv/bin/python -m pytest tests/test_reliability.py -q -m slow         # 5 more kill trials, ~50 s
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vegalm.cli import main
from vegalm.train.checkpoint import MARKER, latest_checkpoint, load_checkpoint
from _data import CORPUS_DIR, GLUE_DIR, needs, require

REPO = Path(__file__).resolve().parents[1]
GLUE = GLUE_DIR
SMOKE = str(REPO / "recipes" / "smoke.yaml")

_spec = importlib.util.spec_from_file_location("kill_resume", REPO / "bench" / "kill_resume.py")
kr = sys.modules.setdefault("kill_resume", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(kr)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> kr.Setup:
    """Shared corpus + tokenizer, and one uninterrupted reference run (a subprocess, ~8 s)."""
    require(CORPUS_DIR)
    return kr.setup(tmp_path_factory.mktemp("kr"))


def pretrain_argv(s: kr.Setup, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--recipe", SMOKE, "--out", str(out), *s.extra, *extra]


def cli_error(capsys, argv: list[str]) -> str:
    """Run `vegalm ARGV` in-process; it must fail with exit 2 and exactly one `error:` line, no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, f"exit {rc}, stderr:\n{err[-2000:]}"
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def run_cli(s: kr.Setup, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m vegalm.cli ARGV` in a fresh process with the reference run's environment (1 thread)."""
    return subprocess.run(kr.cli(*argv), capture_output=True, text=True, env=kr.base_env(env), cwd=REPO,
                          timeout=300)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exit 2 and exactly one `error:` line on stderr, without a traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------- 1. kill -9 and resume
def _check_trials(s: kr.Setup, tmp_path: Path, seed: int, kills: list[int]) -> None:
    rng = random.Random(seed)
    reports = [kr.trial(s, tmp_path / f"trial{i}", rng, kills=k) for i, k in enumerate(kills)]
    text = "\n".join(json.dumps({k: r[k] for k in ("events", "runs")}) for r in reports)
    print(text)
    for r in reports:
        assert r["events"] and r["events"][0]["killed"], f"the first kill did not land:\n{text}"
        assert not r["problems"], "\n".join(r["problems"])


def test_kill9_pretrain_then_rerun_is_bit_exact(setup, tmp_path):
    """Two trials: one kill, then two kills (the second on the resumed run); re-runs of the same command."""
    assert (setup.ref / "discriminator" / "model.safetensors").is_file()
    assert not kr.differences(setup.ref, setup.ref)
    _check_trials(setup, tmp_path, seed=2024, kills=[1, 2])


@pytest.mark.slow
def test_kill9_pretrain_five_more_trials(setup, tmp_path):
    _check_trials(setup, tmp_path, seed=7, kills=[1] * 5)


def test_differences_detects_a_changed_weight(setup, tmp_path):
    """The bit-exactness check itself can fail: flip one weight of a copy of the reference."""
    from safetensors.torch import save_file

    out = tmp_path / "copy"
    shutil.copytree(setup.ref, out)
    path = out / "phase2" / "checkpoints" / "step-000004" / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-6
    save_file(tensors, str(path))
    diffs = kr.differences(setup.ref, out)
    assert len(diffs) == 1 and "phase2/checkpoints/step-000004" in diffs[0]


def test_sigterm_pretrain_says_how_to_resume_then_rerun_is_bit_exact(setup, tmp_path):
    """SIGTERM (what Slurm / Kubernetes send) mid-phase-1: a checkpoint at the next step boundary, one line,
    exit 143; re-running the same command gives the uninterrupted run's weights bit for bit."""
    out = tmp_path / "run"
    cmd = kr.pretrain_cmd(out, setup.extra)
    log = tmp_path / "term.log"
    proc = kr._launch(cmd, log, setup.env)
    metrics = out / "phase1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:  # step 2 of 8 logged
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("interrupted at step")]
    assert rc == 143 and len(lines) == 1 and "Traceback" not in text, text[-3000:]
    m = re.fullmatch(r"interrupted at step (\d+): checkpoint saved in (\S+); run the same command again to resume",
                     lines[0])
    assert m and Path(m[2]).parent == out / "phase1" / "checkpoints", lines[0]
    assert (Path(m[2]) / MARKER).is_file() and latest_checkpoint(Path(m[2]).parent) == Path(m[2])
    assert not (out / "phase1" / "done.json").exists() and not (out / "summary.json").exists()
    rc, _ = kr.run_to_end(cmd, tmp_path / "rerun.log", setup.env)
    assert rc == 0, (tmp_path / "rerun.log").read_text()[-2000:]
    assert f"resumed from {m[2]}" in (tmp_path / "rerun.log").read_text()
    assert kr.differences(setup.ref, out) == []


@pytest.mark.slow
def test_sigterm_run_with_two_workers_checkpoints_both_then_resumes(setup, tmp_path):
    """`vegalm run --jobs 2` SIGTERMed, the parent only (as a scheduler would): it forwards the signal, both
    pretraining workers checkpoint at their next step, it waits for them and exits 143 with one line; the same
    command then resumes both pretrainings and finishes. ~2 minutes on 2 shared cores."""
    out = tmp_path / "run"
    data = [a for a in setup.extra if a.startswith(("data.corpus=", "data.tokenizer="))]
    extra = [*data, "data.num_proc=1", "data.seq_len=32", "phase1.train.max_steps=1500", "phase1.train.save_every=1000",
             "phase1.train.log_every=5", "phase1.train.batch_size=8"]  # fmt: skip
    cmd = kr.cli("run", "--recipe", SMOKE, "--out", str(out), "--jobs", "2", *extra)
    log = tmp_path / "term.log"
    proc = kr._launch(cmd, log, setup.env)
    metrics = [out / name / "phase1" / "metrics.jsonl" for name in ("rtd", "mlm")]
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if all(f.is_file() and f.read_text().strip() for f in metrics):  # both workers are training
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=240)
    text = log.read_text()
    assert rc == 143 and "Traceback" not in text, text[-3000:]
    assert [ln for ln in text.splitlines() if ln.startswith("interrupted")] == [
        "interrupted: the workers stopped at a step boundary (pretraining, and fine-tuning with checkpoint_every, "
        "saved a checkpoint; finished runs are cached); run the same command again to resume"], text[-3000:]
    for name in ("rtd", "mlm"):
        ckpt = latest_checkpoint(out / name / "phase1" / "checkpoints")
        assert ckpt is not None and not (out / name / "phase1" / "done.json").exists(), name
    rc, _ = kr.run_to_end(cmd, tmp_path / "rerun.log", setup.env, timeout=600)
    rerun = (tmp_path / "rerun.log").read_text()
    assert rc == 0 and (out / "summary.json").is_file(), rerun[-3000:]
    assert rerun.count("resumed from ") == 2, rerun[-3000:]


def test_exported_files_follow_hf_conventions(setup):
    """The reference run's real export: config.json says which transformers wrote it and has no stale
    torch_dtype; tokenizer_config.json holds no loading-time keys; both folders load in transformers."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from vegalm.model.hf import RUNTIME_TOKENIZER_KEYS

    for name in ("discriminator", "generator"):
        folder = setup.ref / name
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["transformers_version"] == transformers.__version__ and "torch_dtype" not in cfg
        assert cfg["dtype"] == "float32"
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        assert not set(tok_cfg) & set(RUNTIME_TOKENIZER_KEYS), sorted(tok_cfg)
        assert AutoModel.from_pretrained(folder).config.hidden_size == cfg["hidden_size"]
        assert AutoTokenizer.from_pretrained(folder)("a test")["input_ids"]


def test_raw_rtd_pair_loads_with_heads_and_continues(setup):
    """The raw RTD models of the export: the generator with its MLM head in transformers'
    AutoModelForMaskedLM (same logits as ours), the discriminator with its RTD head (the trained one, bit
    for bit), and the pair re-shared by RTDModel.from_parts computes the RTD loss (docs/rtd-export.md)."""
    from transformers import AutoModelForMaskedLM

    from vegalm.model.modeling import VegaForMaskedLM, VegaForRTD
    from vegalm.pretrain.rtd import ObjectiveConfig, RTDModel

    gen_dir, disc_dir = setup.ref / "generator", setup.ref / "discriminator"
    torch.manual_seed(0)
    ids = torch.randint(5, 400, (2, 16))
    mask = torch.ones_like(ids)
    ours = VegaForMaskedLM.from_pretrained(gen_dir).eval()
    hf = AutoModelForMaskedLM.from_pretrained(gen_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    disc = VegaForRTD.from_pretrained(disc_dir)
    trained = load_file(str(setup.ref / "phase2" / "checkpoints" / "step-000004" / "model.safetensors"))
    head = {k: v for k, v in disc.state_dict().items() if k.startswith("mask_predictions.")}
    assert len(head) == 6 and all(torch.equal(v, trained["discriminator." + k]) for k, v in head.items())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gen_dir)
    special = (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    pair = RTDModel.from_parts(ours.train(), disc, ObjectiveConfig(), mask_id=tok.mask_token_id, special_ids=special)
    loss = pair(input_ids=ids, attention_mask=mask)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and disc.deberta.embeddings.word_embeddings.delta.grad is not None


# --------------------------------------------------------------------------------- 2. kill inside a checkpoint write
def test_kill_during_checkpoint_write(setup, tmp_path):
    out = tmp_path / "run"
    cmd = kr.pretrain_cmd(out, setup.extra)
    rc, _ = kr.run_to_end(cmd, tmp_path / "abort.log", kr.base_env({"VEGALM_TEST_CKPT_ABORT": "4"}))
    assert rc == 86, (tmp_path / "abort.log").read_text()[-2000:]  # died half-way through phase 1's step-4 save
    ckpts = out / "phase1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    partial = ckpts / ".tmp-step-000004"
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    assert not (ckpts / "step-000004").exists()
    assert kr.latest_problems(out) == []
    assert latest_checkpoint(ckpts) == ckpts / "step-000002"
    # The previous checkpoint loads (weights_only) and holds exactly the reference run's step-2 weights.
    state = load_checkpoint(ckpts / "step-000002", model=None, restore_rng_state=False)
    assert state["step"] == 2
    torch.load(ckpts / "step-000002" / "optimizer.pt", weights_only=True)
    ref = load_file(str(setup.ref / "phase1" / "checkpoints" / "step-000002" / "model.safetensors"))
    got = load_file(str(ckpts / "step-000002" / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    rc, _ = kr.run_to_end(cmd, tmp_path / "rerun.log", kr.base_env())
    assert rc == 0, (tmp_path / "rerun.log").read_text()[-2000:]
    assert not partial.exists(), "stale partial checkpoint left behind"
    assert kr.differences(setup.ref, out) == []


# --------------------------------------------------------------------------------- 3. bad inputs
def write_bad_corpus(d: Path, good: Path) -> dict[str, int]:
    """A BOM file, invalid UTF-8, an empty and a blank file, and a 10 MB single line; returns what to expect."""
    d.mkdir(parents=True)
    docs = good.read_text(encoding="utf-8").split("\n\n")[:20]
    (d / "a_bom.txt").write_bytes(b"\xef\xbb\xbf" + "\n\n".join(docs[:5]).encode())
    bad = "\n\n".join(docs[5:10]).encode().replace(b" the ", b" th\xff\xfe ", 3)  # 3 invalid sequences
    (d / "b_bad_utf8.txt").write_bytes(bad)
    (d / "c_empty.txt").write_bytes(b"")
    (d / "d_blank.txt").write_bytes(b"\n\n   \n\t\n")
    words = " ".join(docs[10:20]).split()
    rng = random.Random(0)
    chunk = " ".join(rng.choice(words) for _ in range(50_000))
    line = (chunk + " ") * (10_000_000 // (len(chunk) + 1) + 1)
    (d / "e_huge_line.txt").write_text(line[:10_000_000], encoding="utf-8")  # no newline at all
    bad_lines = sum(1 for ln in bad.split(b"\n") if b"\xff" in ln)
    return {"files": 5, "empty_files": 2, "bad_utf8_lines": bad_lines, "long_lines_split": 1}


def test_pretrain_on_a_dirty_corpus(setup, tmp_path):
    corpus = tmp_path / "corpus"
    want = write_bad_corpus(corpus, setup.work / "corpus.txt")
    out = tmp_path / "out"
    steps = ["phase1.train.max_steps=2", "phase2.train.max_steps=1", f"data.corpus={corpus}"]
    proc = run_cli(setup, pretrain_argv(setup, out, *steps))
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "data" / "meta.json").read_text())
    stats = meta["stats"]
    for key, value in want.items():
        assert stats[key] == value, (key, stats)
    assert stats["long_docs_split"] >= 9  # 10 M characters, documents of at most 1 M
    assert stats["docs"] == 5 + 5 + 10 and stats["bytes"] > 10_000_000
    assert (out / "discriminator" / "model.safetensors").is_file()
    from vegalm.data.documents import iter_documents

    first = next(iter(iter_documents([corpus / "a_bom.txt"])))
    assert not first.startswith("\ufeff")


@pytest.fixture()
def rte_dir(tmp_path) -> Path:
    """A GLUE dir holding the first 20 lines of the real RTE train/dev/test files."""
    require(GLUE)
    root = tmp_path / "glue"
    (root / "RTE").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        lines = (GLUE / "RTE" / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:20]
        (root / "RTE" / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    return root


def _edit(path: Path, line_no: int, fn) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line_no - 1] = fn(lines[line_no - 1])
    path.write_text("\n".join(lines), encoding="utf-8")


BAD_TSV = {
    "missing_column": ("train", 1, lambda ln: "\t".join(ln.split("\t")[:3]), "1: missing column 'label'"),
    "extra_tabs": ("dev", 3, lambda ln: ln.replace("\t", "\t\t", 1), "3: expected 4 tab-separated columns"),
    "unknown_label": ("train", 4, lambda ln: ln.rsplit("\t", 1)[0] + "\tmaybe", "4: unknown label 'maybe'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TSV))
def test_finetune_on_bad_glue_tsv(setup, rte_dir, tmp_path, capsys, case):
    split, line, fn, msg = BAD_TSV[case]
    path = rte_dir / "RTE" / f"{split}.tsv"
    _edit(path, line, fn)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"task": "rte", "dev_score": 71.5, "config_hash": "0" * 16}))
    before = snapshot(out)
    model = str(setup.ref / "discriminator")
    err = cli_error(capsys, ["finetune", "--task", "rte", "--model", model, "--out", str(out),
                             f"glue_dir={rte_dir}", "max_steps=1", "progress=false"])
    assert f"{path}:{msg}" in err, err
    assert snapshot(out) == before, "a good results.json was touched"


def test_finetune_bad_glue_through_a_real_process(setup, rte_dir, tmp_path):
    """The same as above as a user sees it: stderr of a fresh `python -m vegalm.cli` process."""
    split, line, fn, msg = BAD_TSV["unknown_label"]
    path = rte_dir / "RTE" / f"{split}.tsv"
    _edit(path, line, fn)
    proc = run_cli(setup, ["finetune", "--task", "rte", "--model", str(setup.ref / "discriminator"), "--out",
                           str(tmp_path / "ft"), f"glue_dir={rte_dir}", "max_steps=1"])
    assert f"{path}:{msg}" in one_error(proc)
    assert not (tmp_path / "ft" / "results.json").exists()


@needs(GLUE)
@pytest.mark.parametrize("command", ["finetune", "glue"])
def test_wrong_model_path(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"good": true}\n')
    before = snapshot(out)
    missing = tmp_path / "no-such-model"
    argv = {"finetune": ["finetune", "--task", "rte"], "glue": ["glue", "--tasks", "rte", "--seeds", "1"]}[command]
    err = cli_error(capsys, [*argv, "--model", str(missing), "--out", str(out), f"glue_dir={GLUE}"])
    assert f"model={missing}" in err and "no such model directory" in err, err
    assert snapshot(out) == before


RECIPES = {
    "unknown_key": ("phase1:\n  train:\n    learning_rate: 0.001\n", "unknown key phase1.train.learning_rate"),
    "wrong_type": ("phase1:\n  train:\n    max_steps: ten\n", "phase1.train.max_steps: expected an integer"),
    "wrong_section_type": ("model: 64\n", "model: expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
@pytest.mark.parametrize("command", ["pretrain", "run"])
def test_bad_recipe_names_the_key(tmp_path, capsys, case, command):
    body, msg = RECIPES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"base: {SMOKE}\n{body}")
    out = tmp_path / "out"
    err = cli_error(capsys, [command, "--recipe", str(recipe), "--out", str(out)])
    assert str(recipe) in err and msg in err, err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("override, msg", [
    ("phase1.train.max_stepz=3", "unknown key phase1.train.max_stepz"),
    ("phase1.train.max_steps=ten", "phase1.train.max_steps: expected an integer, got 'ten'"),
    ("model.hidden_size=1.5", "model.hidden_size: expected an integer"),
    ("data.max_docs=[1]", "data.max_docs: expected int"),
])
def test_bad_override_names_the_key(tmp_path, capsys, override, msg):
    err = cli_error(capsys, ["pretrain", "--recipe", SMOKE, "--out", str(tmp_path / "out"), override])
    assert msg in err, err


@pytest.mark.parametrize("corpus, msg", [
    ("{tmp}/nowhere/corpus.txt", "corpus: path not found: {tmp}/nowhere/corpus.txt"),
    ("{tmp}/nowhere/*.txt.gz", "corpus: no files match {tmp}/nowhere/*.txt.gz"),
])
@pytest.mark.parametrize("shared_tokenizer", [True, False])
def test_missing_corpus_leaves_a_finished_run_alone(setup, tmp_path, capsys, corpus, msg, shared_tokenizer):
    out = tmp_path / "done"
    shutil.copytree(setup.ref, out)  # a finished run; re-running with a bad corpus must not touch it
    before = snapshot(out)
    corpus, msg = corpus.format(tmp=tmp_path), msg.format(tmp=tmp_path)
    extra = [f"data.corpus={corpus}"] + ([] if shared_tokenizer else ["data.tokenizer=null"])
    err = cli_error(capsys, pretrain_argv(setup, out, *extra))
    assert msg in err, err
    assert snapshot(out) == before


# --------------------------------------------------------------------------------- 4. NaN / inf
def test_one_nan_step_is_skipped_and_counted(setup, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(setup, pretrain_argv(setup, out), {"VEGALM_TEST_NAN_STEPS": "3"})  # step 3 of each phase
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"]["phase1"]["skipped_steps"] == 1
    assert summary["phases"]["phase2"]["skipped_steps"] == 1
    rows = [json.loads(ln) for ln in (out / "phase1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[2]["loss"] is None and rows[1]["loss"] is not None and rows[3]["loss"] is not None
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert proc.stderr.count("step 3: non-finite loss (nan); update skipped (1 in a row, 1 in total)") == 2
    weights = load_file(str(out / "discriminator" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The skipped step changed nothing: step-2 weights equal the reference's, later ones do not.
    ref2 = load_file(str(setup.ref / "phase1" / "checkpoints" / "step-000002" / "model.safetensors"))
    got2 = load_file(str(out / "phase1" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert all(torch.equal(ref2[k], got2[k]) for k in ref2)


def test_repeated_nans_stop_with_a_diagnostic(setup, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(setup, pretrain_argv(setup, out, "phase1.train.max_bad_steps=3"), {"VEGALM_TEST_NAN_STEPS": "2,3,4"})
    err = one_error(proc)
    assert "stopping at step 4: the loss was non-finite for 3 steps in a row (steps 2-4" in err, err
    assert "lower train.lr" in err
    assert not (out / "phase1" / "done.json").exists() and not (out / "discriminator").exists()


# --------------------------------------------------------------------------------- 5. safe loading
def unsafe_loads(source: str, name: str = "<src>") -> list[str]:
    """Calls that may unpickle: torch.load without weights_only=True, pickle/dill/joblib loads,
    numpy load with allow_pickle not False; imports that would hide such calls behind another name."""
    found = []

    def true(node) -> bool:
        return isinstance(node, ast.Constant) and node.value is True

    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "cPickle", "dill", "joblib"):
            found.append(f"{where}: from {node.module} import ...")
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy"):
            if any(a.name == "load" for a in node.names):
                found.append(f"{where}: from {node.module} import load")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if func == "torch.load" and not true(kw.get("weights_only")):
            found.append(f"{where}: {func}(...) without weights_only=True")
        elif func.split(".")[0] in ("pickle", "_pickle", "cPickle", "dill", "joblib") and "load" in func:
            found.append(f"{where}: {func}(...)")
        elif func in ("np.load", "numpy.load") and "allow_pickle" in kw:
            value = kw["allow_pickle"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: {func}(..., allow_pickle={ast.unparse(value)})")
    return found


def test_scanner_catches_unsafe_loads():
    bad = ("import torch, pickle, numpy as np\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "pickle.load(f)\npickle.loads(b)\nnp.load(p, allow_pickle=True)\nfrom pickle import load\n")
    assert len(unsafe_loads(bad)) == 6
    good = ("import torch, numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\n"
            "np.load(p, mmap_mode='r')\n")
    assert unsafe_loads(good) == []


def test_src_never_unpickles():
    files = sorted((REPO / "src" / "vegalm").rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == []
