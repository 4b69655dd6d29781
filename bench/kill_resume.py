"""kill -9 / resume trials of `vegalm pretrain`, through the real command line.

    .venv/bin/python bench/kill_resume.py --trials 20                 # ~3 min on 2 CPU cores
    .venv/bin/python bench/kill_resume.py --trials 5 --kills 2 --work /tmp/kr --seed 7

What it does: writes a 200-article corpus (from ../shared/data/corpus/wikipedia) and a 400-piece tokenizer,
shared by every run; runs `python -m vegalm.cli pretrain --recipe recipes/smoke.yaml` (shrunk by overrides:
a 2 x 32 encoder, 8 phase-1 + 4 phase-2 steps, a checkpoint every 2 steps) once without interruption; then
per trial starts the same command in a fresh folder, SIGKILLs its process group at a seeded random moment
(`--kills` times, each on the next re-run), and re-runs the identical command until it exits 0. After every
kill, each phase's `checkpoints/latest` must name a complete checkpoint (one with its COMPLETE marker).
At the end the trial's exported discriminator/generator, every phase checkpoint's model.safetensors and
every metrics.jsonl value (timings aside) must equal the uninterrupted run's bit for bit.

Kill moments: uniform over the reference run's span from its first trainer log line (imports, tokenizer
and segments done) to the moment its summary.json (its last output) appeared, so kills land in training,
checkpoint writes and the export rather than in the interpreter's shutdown. VEGALM_TEST_CKPT_SLEEP=0.03
(sleeps between the files of each checkpoint, no effect on the numbers) widens the windows in which a kill
lands mid-write. A typical run of 20 trials: kills after 0.2-0.7 s, in every phase-1 checkpoint write, between
the phases, and in phase 2's writes; all 20 bit-identical.
The same machinery backs tests/test_reliability.py (2 trials there, 5 in its slow test).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "corpus" / "wikipedia" / "wiki-000.txt.gz"
PHASE_STEPS = {"phase1": 8, "phase2": 4}
# Values that differ between runs by nature (wall-clock); every other metrics.jsonl field must match.
TIMING_KEYS = {"tokens_per_s", "elapsed"}
# The trainer's first log line ("no checkpoint under ..." / "resumed from ..."): imports and data are done.
READY = re.compile(r"INFO vegalm\.train\.trainer")


def make_corpus(path: Path, n_docs: int = 200) -> Path:
    """The first `n_docs` Wikipedia articles as one .txt file (blank-line separated, the corpus format)."""
    docs, cur = [], []
    with gzip.open(WIKI, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                cur.append(line.rstrip("\n"))
            elif cur:
                docs.append("\n".join(cur))
                cur = []
                if len(docs) >= n_docs:
                    break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def make_tokenizer(corpus: Path, out: Path, vocab_size: int = 400) -> Path:
    from vegalm.data.tokenizer import train_tokenizer

    # seed_size: a small seed vocabulary for a 400-piece model keeps training to ~3 s
    train_tokenizer(str(corpus), vocab_size, out, progress=False, seed_size=20_000)
    return out


def overrides(corpus: Path, tokenizer: Path) -> list[str]:
    """smoke.yaml shrunk to seconds; log_every=1 so a resumed run's metrics lines match line for line."""
    out = [f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", "data.num_proc=1", "data.seq_len=32",
           "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2"]
    for phase, steps in PHASE_STEPS.items():
        t = f"{phase}.train"
        out += [f"{t}.max_steps={steps}", f"{t}.save_every=2", f"{t}.log_every=1", f"{t}.batch_size=8",
                f"{t}.keep_last=10", f"{t}.progress=false", f"{t}.warmup_steps=1"]
    return out


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    for key in ("VEGALM_TEST_CKPT_ABORT", "VEGALM_TEST_CKPT_SLEEP", "VEGALM_TEST_NAN_STEPS",
                "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vegalm.cli", *args]


def pretrain_cmd(out: Path, extra: list[str]) -> list[str]:
    return cli("pretrain", "--recipe", str(REPO / "recipes" / "smoke.yaml"), "--out", str(out), *extra)


@dataclass
class Setup:
    """What every trial shares: the command's overrides and the uninterrupted reference run."""

    work: Path
    extra: list[str]
    ref: Path
    span: float  # seconds from the reference's first trainer log line to its summary.json (the last write)
    env: dict = field(default_factory=dict)


def _launch(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> float:
    """Block until the run logged its first trainer line or exited; returns that moment."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if READY.search(log.read_text(encoding="utf-8", errors="replace")):
            break
        time.sleep(0.005)
    return time.monotonic()


def run_to_end(cmd: list[str], log: Path, env: dict, timeout: float = 300.0,
               done: Path | None = None) -> tuple[int, float]:
    """Run a command to completion; returns (exit status, seconds from its first trainer log line until the
    file `done` appeared, or until the exit when `done` is None or never appears)."""
    proc = _launch(cmd, log, env)
    ready = _wait_ready(proc, log, timeout)
    seen = None
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if seen is None and done is not None and done.is_file():
            seen = time.monotonic()
        time.sleep(0.005)
    rc = proc.wait(timeout=max(1.0, end - time.monotonic()))
    return rc, (seen or time.monotonic()) - ready


def setup(work: Path, sleep: float = 0.03) -> Setup:
    """Corpus, tokenizer and the uninterrupted reference run under `work` (reused when already there)."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if not corpus.is_file():
        make_corpus(corpus)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        make_tokenizer(corpus, tok)
    extra = overrides(corpus, tok)
    env = base_env({"VEGALM_TEST_CKPT_SLEEP": str(sleep)})
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    rc, span = run_to_end(pretrain_cmd(ref, extra), work / "reference.log", env, done=ref / "summary.json")
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}):\n{(work / 'reference.log').read_text()[-3000:]}")
    return Setup(work, extra, ref, span, env)


# ------------------------------------------------------------------------------------------ checks
def latest_problems(out: Path) -> list[str]:
    """Each phase's `latest` pointer, if present, must name a checkpoint with its COMPLETE marker."""
    bad = []
    for phase in PHASE_STEPS:
        pointer = out / phase / "checkpoints" / "latest"
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if not (pointer.parent / name / "COMPLETE").is_file():
                bad.append(f"{pointer} -> {name!r}, which is not a complete checkpoint")
    return bad


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def weight_files(out: Path) -> list[str]:
    """The model weights to compare, relative to the run folder."""
    files = ["discriminator/model.safetensors", "generator/model.safetensors"]
    for phase, steps in PHASE_STEPS.items():
        files += [f"{phase}/checkpoints/step-{s:06d}/model.safetensors" for s in range(2, steps + 1, 2)]
    return files


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def differences(ref: Path, out: Path) -> list[str]:
    """Every way `out` differs from the reference run (empty list: bit-identical)."""
    import torch

    diffs = []
    for rel in weight_files(ref):
        a, b = ref / rel, out / rel
        if not b.is_file():
            diffs.append(f"{rel}: missing")
            continue
        ta, tb = _tensors(a), _tensors(b)
        if ta.keys() != tb.keys():
            diffs.append(f"{rel}: tensor names differ")
            continue
        bad = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        if bad:
            diffs.append(f"{rel}: {len(bad)} tensor(s) differ, e.g. {bad[0]}")
    for phase in PHASE_STEPS:
        ma, mb = _metrics(ref / phase / "metrics.jsonl"), _metrics(out / phase / "metrics.jsonl")
        if ma != mb:
            diffs.append(f"{phase}/metrics.jsonl: {len(mb)} lines, differs from the reference's {len(ma)}")
    if not (out / "summary.json").is_file():
        diffs.append("summary.json: missing")
    return diffs


# ------------------------------------------------------------------------------------------ trials
def trial(s: Setup, out: Path, rng: random.Random, kills: int = 1, factor: float = 1.0) -> dict:
    """Kill the run `kills` times at random moments, re-run until it exits 0; returns a report dict."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = pretrain_cmd(out, s.extra)
    events, problems, attempt = [], [], 0
    for k in range(kills):
        delay = rng.uniform(0.0, factor) * s.span
        for _ in range(3 if k == 0 else 1):  # a first run that beat its kill (a faster moment) is redone
            log = out.with_name(f"{out.name}.run{attempt}.log")
            attempt += 1
            proc = _launch(cmd, log, s.env)
            _wait_ready(proc, log)
            time.sleep(delay)
            if k > 0 or proc.poll() is None or proc.returncode != 0:
                break
            proc.wait()
            shutil.rmtree(out, ignore_errors=True)
            delay /= 2
        if proc.poll() is not None:  # finished (or failed) before the kill: nothing more to interrupt
            events.append({"kill": k, "delay_s": round(delay, 3), "killed": False, "rc": proc.returncode})
            if proc.returncode != 0:
                problems.append(f"run {attempt} exited {proc.returncode} before the kill: "
                                f"{log.read_text()[-2000:]}")
            break
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        stage = _stage(out)
        events.append({"kill": k, "delay_s": round(delay, 3), "killed": rc == -signal.SIGKILL, "stage": stage})
        problems += latest_problems(out)
    for _ in range(3):  # re-run the identical command until it finishes (once should do)
        log = out.with_name(f"{out.name}.run{attempt}.log")
        attempt += 1
        rc, _ = run_to_end(cmd, log, s.env)
        if rc == 0:
            break
        problems.append(f"re-run {attempt} exited {rc}: {log.read_text()[-2000:]}")
    problems += latest_problems(out) + differences(s.ref, out)
    return {"out": str(out), "events": events, "runs": attempt, "problems": problems}


def _stage(out: Path) -> str:
    """Where the killed run was, from what it left on disk (for the report)."""
    parts = []
    for phase in PHASE_STEPS:
        ck = out / phase / "checkpoints"
        if (out / phase / "done.json").is_file():
            parts.append(f"{phase} done")
        elif ck.is_dir():
            latest = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
            tmp = sorted(p.name for p in ck.glob(".tmp-*"))
            parts.append(f"{phase} latest={latest}" + (f" partial={tmp}" if tmp else ""))
    if (out / "summary.json").is_file():
        parts.append("exported")
    return ", ".join(parts) or "before training"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=1, help="kills per trial (each on the next re-run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/kill_resume")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    t0 = time.time()
    s = setup(Path(args.work).resolve())
    print(f"reference run: {s.ref} ({s.span:.2f} s from training start to summary.json)", flush=True)
    rng = random.Random(args.seed)
    failed = killed = 0
    for i in range(args.trials):
        rep = trial(s, s.work / f"trial{i:02d}", rng, kills=args.kills)
        killed += sum(e["killed"] for e in rep["events"])
        failed += bool(rep["problems"])
        ev = "; ".join(f"{e['delay_s']:.2f}s -> {e.get('stage', 'finished first')}" for e in rep["events"])
        print(f"trial {i:2d}: {'FAIL' if rep['problems'] else 'ok  '} {rep['runs']} runs, kills: {ev}", flush=True)
        for p in rep["problems"]:
            print(f"    {p}", flush=True)
    print(f"{args.trials - failed}/{args.trials} trials bit-identical to the uninterrupted run "
          f"({killed} kills landed); {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
