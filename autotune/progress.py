"""Progress of a tuning run: a live line, a history of the estimated model latency, and its plot.

Requires: the tasks being tuned with their weights, what the database already held
(trials, best latency) and each task's default-schedule latency where measured.
Guarantees: after every measured batch, ``Progress.update`` refreshes the line (task,
trials, best latency, estimated model latency) and appends one JSON line to
``history.jsonl`` beside the records; its time axis continues across resumed runs.
The estimate is the weighted sum over tasks of the best known latency, tuned or
default; a task with neither is left out and the line says so.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"


@dataclass
class TaskState:
    name: str
    weight: float
    trials: int
    best: float | None  # seconds, tuned
    default: float | None  # seconds, default schedule

    @property
    def known(self) -> float | None:
        vals = [v for v in (self.best, self.default) if v is not None]
        return min(vals) if vals else None


def estimate(tasks: list[TaskState], latency=lambda t: t.known) -> tuple[float | None, int]:
    """(Σ weight × ``latency(task)`` over the tasks that have one, or None if none has; tasks without)."""
    known = [(t.weight, latency(t)) for t in tasks if latency(t) is not None]
    return (sum(w * v for w, v in known) if known else None), len(tasks) - len(known)


class Progress:
    """Counts trials per task and renders them; ``enabled=False`` keeps the history only."""

    def __init__(self, tasks: list[TaskState], budget: int, record_dir: Path, enabled: bool = True, stream=None):
        self.tasks = tasks
        self.budget = budget
        self.new_trials = 0
        self.batch: list[int] = [0]  # the tasks of the MetaSchedule call in flight, by its task ids
        self.history = record_dir / HISTORY
        self.offset = _last_time(self.history)
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._append(0)

    def update(self, task_id: int, run_secs: list[list[float] | None]) -> None:
        t = self.tasks[task_id]
        for secs in run_secs:
            t.trials += 1
            self.new_trials += 1
            if secs and all(s < 1e9 for s in secs):  # MetaSchedule reports failed runs as 1e10
                mean = sum(secs) / len(secs)
                t.best = mean if t.best is None else min(t.best, mean)
        self._append(self.new_trials)
        if self.enabled:
            self._render(t)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _append(self, trials: int) -> None:
        est, missing = estimate(self.tasks)
        entry = {"seconds": round(self.offset + time.perf_counter() - self.t0, 3), "new_trials": trials,
                 "estimate_s": est, "tasks_without_latency": missing}
        with open(self.history, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _render(self, task: TaskState) -> None:
        est, missing = estimate(self.tasks)
        done = min(self.new_trials, self.budget)
        width = 20
        filled = int(width * done / max(self.budget, 1))
        elapsed = time.perf_counter() - self.t0
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.budget} trials {_clock(elapsed)} | "
                f"{task.name} ({task.trials} trials, best {_us(task.best)}) | model ~{_ms(est)}"
                + (f" ({missing} tasks unmeasured)" if missing else ""))
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(200))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _last_time(path: Path) -> float:
    """Where the time axis of an earlier run in the same folder ended (0 for a fresh folder)."""
    if not path.is_file():
        return 0.0
    last = 0.0
    for line in path.read_text().splitlines():
        try:
            last = max(last, float(json.loads(line)["seconds"]))
        except (ValueError, KeyError, TypeError):
            continue  # a torn line from a killed run
    return last


def read_history(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot(record_dir: Path, png: Path, title: str = "") -> Path | None:
    """A PNG of the estimated model latency against cumulative tuning time; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    points = [(h["seconds"] / 60, h["estimate_s"] * 1e3) for h in read_history(record_dir / HISTORY)
              if h.get("estimate_s") is not None and math.isfinite(h["estimate_s"])]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.step([p[0] for p in points], [p[1] for p in points], where="post")
    ax.set_xlabel("tuning time (min)")
    ax.set_ylabel("estimated model latency (ms)")
    ax.set_title(title or record_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f} us"


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.3f} ms"
