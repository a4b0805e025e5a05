"""Metrics: one JSON object per line in metrics.jsonl, the same scalars in TensorBoard, and a rich progress bar.
Only rank 0 writes or prints."""

from __future__ import annotations

import atexit
import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stages.runtime import atomic_write_text
from stages.errors import RlhfError, resume_with


def json_safe(value: Any) -> Any:
    """`value` (a scalar, or dicts and lists of them) with every non-finite float as its string ("nan", "inf"),
    so the file stays strict JSON (readers such as jq refuse a bare NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends rows to `out_dir/metrics.jsonl` and TensorBoard. On resume from step S, rows after S (written by
    the interrupted run after its last checkpoint) are dropped first, so the curve continues cleanly; so is a
    "final" event at S (a finished run resumed from its last checkpoint publishes final/ again and logs it once)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            keep_rows_upto(self.path, "step", resume_step, redone_events=("final",))
        else:
            self.path.write_text("", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
            # also on a failure's way out: the writer holds up to 2 minutes of scalars (its flush_secs), the
            # last steps before a crash, which are the ones a failed run is looked at for
            atexit.register(self.writer.close)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **json_safe(values)}
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:  # a full disk shows here first, between checkpoints
            raise RlhfError(f"cannot append to {self.path} at step {step}: {exc}; the checkpoints already "
                            f"written are intact (continue {resume_with()} once there is space)") from None
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def event(self, step: int, name: str, **info: Any) -> None:
        """A non-scalar happening (e.g. checkpoint saved), as a row with an "event" field."""
        self.log(step, {"event": name, **info})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def keep_rows_upto(path: Path, key: str, upto: int, redone_events: tuple[str, ...] = ()) -> None:
    """Drop the rows of a JSON-lines file whose `key` is above `upto` (written by an interrupted run after its
    last checkpoint), the events named in `redone_events` (which the resumed run writes again), and a line cut
    by a crash or a full disk; rewritten atomically (a crash while it runs leaves the old file). Nothing when
    the file does not exist."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get(key, 0) <= upto and row.get("event") not in redone_events:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


_CONSOLE = Console()  # writes to whatever sys.stdout is at the time (a test runner swaps it)


def say(enabled: bool, message: str) -> None:
    """Print a line (rich markup allowed) when `enabled` (i.e. on rank 0)."""
    if enabled:
        _CONSOLE.print(message, highlight=False, soft_wrap=True)


class TrainProgress:
    """Rich progress bar (steps, loss, lr, tokens/s, ETA) on a terminal; one plain line per logged step
    otherwise (CI logs, files)."""

    def __init__(self, enabled: bool, total: int, start: int, description: str, print_every: int = 1,
                 unit: str = "step") -> None:
        self.enabled, self.unit = enabled, unit
        self.print_every = print_every
        self.console = _CONSOLE
        self.live = enabled and self.console.is_terminal
        self.total = total
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(description, total=total, completed=start, stats="")
            self.progress.start()

    def update(self, step: int, stats: dict[str, float], note: str = "") -> None:
        """Show step `step`'s stats, then `note` (e.g. what kind of step it was)."""
        if not self.enabled:
            return
        text = "  ".join([_fmt(k, v) for k, v in stats.items()] + ([note] if note else []))
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=text)
        elif step % self.print_every == 0 or step == self.total:
            self.console.print(f"{self.unit} {step}/{self.total}  {text}", highlight=False)

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt(key: str, value: float) -> str:
    if key in ("lr",):
        return f"{key} {value:.2e}"
    if key.endswith("tok/s"):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.4f}"


def print_summary(title: str, rows: list[dict[str, Any]], final: Path | None) -> None:
    """A table of first -> last values of the logged metrics, and where the model went (None: nowhere)."""
    from rich.table import Table

    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if "/" in key and isinstance(value, (int, float)):
                first.setdefault(key, (row["step"], value))
                last[key] = (row["step"], value)
    table = Table(title=title)
    for col in ("metric", "first (step)", "last (step)"):
        table.add_column(col)
    for key in sorted(last):
        if key.endswith(("tokens_seen", "epoch")):
            continue
        (s0, v0), (s1, v1) = first[key], last[key]
        table.add_row(key, f"{v0:.4g} ({s0})", f"{v1:.4g} ({s1})")
    _CONSOLE.print(table)
    _CONSOLE.print(f"final model: {final or 'not saved (train.checkpoints: false)'}", highlight=False, soft_wrap=True)
