"""Wall time of the confirmatory runs that were stopped and resumed, with the earlier processes counted.

The sweep runs the code of 630cdc4, whose results.json `timing.wall_s` counts only the process that finished a
run: a run resumed from checkpoint 400 reports the time of steps 401-N. (Fixed after the freeze: a checkpoint
now stores its training time, docs/output-folders.md.) Each process appends to the run's metrics.jsonl, whose
`elapsed` restarts at 0 in a new process. On resume the Trainer drops the rows after the checkpoint, so the row
before a restart is the checkpoint's step, and its `elapsed` is the earlier process's time for the kept steps
(rows every 10 steps, checkpoints every 100; a signal-stopped run logs and checkpoints its last step too).

    python results/ablation/minilm-l6-confirm/kept_wall.py [RUNS_DIR]    # default ../../../runs/confirm

Writes kept_wall.json beside this file: {record file: {"wall_s": as recorded, "kept_wall_s": with the earlier
processes, "resumed": {part: [resume steps]}}} and prints the records that changed. Needs the run folders
(runs/ is not committed); the JSON it writes is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def earlier_seconds(run: Path) -> tuple[float, list[int]]:
    """Seconds spent by earlier processes up to each resume point, and those points (from metrics.jsonl)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    total, points = 0.0, []
    for prev, row in zip(rows, rows[1:]):
        # a new process begins after `prev` when the clock goes back (a resume from a periodic checkpoint), or when
        # `prev` is off the 10-step grid: the partial window a signal-stopped run logs before its checkpoint
        if row["elapsed"] < prev["elapsed"] or prev["step"] % 10:
            total += prev["elapsed"]  # on resume the Trainer trimmed the rows after the checkpoint, so `prev` is the
            points.append(prev["step"])  # checkpoint's step and its clock
    return total, points


def part_dirs(record: dict, runs: Path) -> dict[str, Path]:
    """Where each part of a record ran (see experiments/ablate/runs.py): a run, or a teacher and a student."""
    recorded = Path(record["run_dir"]).parts  # an absolute path on the machine that ran it: re-rooted at `runs`
    i = max(k for k, name in enumerate(recorded) if name == runs.name)
    run_dir = runs.joinpath(*recorded[i + 1:])
    parts = record["wall_parts_s"]
    if "student" not in parts:
        return {next(iter(parts)): run_dir}
    own_teacher = run_dir / "teacher"
    teacher = own_teacher if own_teacher.is_dir() else runs / "vanilla" / record["task"] / f"seed{record['seed']}"
    return {"student": run_dir, "teacher": teacher}


def main(argv: list[str]) -> int:
    runs = Path(argv[0]) if argv else HERE.parents[2] / "runs" / "confirm"
    out = {}
    for f in sorted(HERE.glob("*__*__seed*.json")):
        record = json.loads(f.read_text())
        extra, resumed = 0.0, {}
        for part, d in part_dirs(record, runs).items():
            res = json.loads((d / "results.json").read_text())
            if abs(res["timing"]["wall_s"] - record["wall_parts_s"][part]) > 0.01:
                raise SystemExit(f"{f.name}: {d} is not the run of part {part!r} (wall_s differs)")
            s, points = earlier_seconds(d)
            if points:
                if res["train"]["resumed_from_step"] != points[-1]:
                    raise SystemExit(f"{d}: last resume at {points[-1]} by metrics.jsonl, "
                                     f"{res['train']['resumed_from_step']} by results.json")
                extra, resumed[part] = extra + s, points
        out[f.name] = {"wall_s": record["wall_s"], "kept_wall_s": round(record["wall_s"] + extra, 2),
                       "resumed": resumed}
        if resumed:
            print(f"{f.name}: {record['wall_s']:.0f} s recorded, {record['wall_s'] + extra:.0f} s with the earlier "
                  f"processes (resumed at {resumed})")
    (HERE / "kept_wall.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
