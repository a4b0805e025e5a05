"""`rlhf report`: training curves of one or more runs as PNG plots, plus a Markdown and JSON summary.

Each run directory holds `metrics.jsonl` (stages/metrics.py). Rows with an "event" field are not curve points
(only `monitor` events are counted). Runs are grouped by their directory name with a trailing `-seed<N>`
stripped, so `ppo-vanilla-seed1` and `ppo-vanilla-seed2` form the group `ppo-vanilla`:

    run label   ppo-vanilla-seed2   -> group ppo-vanilla
    run label   ppo-max             -> group ppo-max (one run)

A group with several seeds is drawn as the mean over seeds with a shaded min-max band, over the steps every
seed logged; a one-run group is just its line. PPO curves are drawn over policy iterations by default
(x_axis="policy"): a run's critic-only iterations (`train/critic_only` = 1, PPO-max's critic pre-training) take
x = 1 - C .. 0 and its first policy update x = 1, so runs with and without critic pre-training line up at the
same number of policy updates (x_axis="iteration": the logged iteration). Written into `out_dir`:

    <panel>.png     one per panel of PANELS that some run has data for (reward.png, kl.png, ...)
    overview.png    all those panels in one grid
    report.md       one row per group: first / last / max of SUMMARY_KEYS (mean over seeds), monitor events
    report.json     the same summary as `write_report` returns
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from stages.errors import ConfigError, DataError

Series = list[tuple[int, float]]  # (step, value) sorted by step, one value per step


class Panel(NamedTuple):
    """One plot: a title, the x-axis name and the metrics drawn on it as (metrics.jsonl key, legend label)."""

    title: str
    series: list[tuple[str, str]]
    xlabel: str = "iteration"


#: The plot set, in drawing order; a panel is skipped when no run logged any of its keys. Extend freely.
PANELS: dict[str, Panel] = {
    "reward": Panel("reward (proxy RM)", [("objective/scores", "rollout"), ("eval/reward", "validation")]),
    "gold_reward": Panel("gold reward", [("objective/gold", "rollout"), ("eval/gold", "validation")]),
    "kl": Panel("KL(policy || reference) per response", [("objective/kl", "rollout"), ("eval/kl", "validation")]),
    "response_length": Panel(
        "response length (tokens)", [("rollout/response_length", "rollout"), ("eval/response_length", "validation")]
    ),
    "perplexity": Panel("policy perplexity on its samples", [("rollout/perplexity", "rollout")]),
    "clipfrac": Panel("clip fraction", [("policy/clipfrac", "policy"), ("val/clipfrac", "value")]),
    "repetition": Panel("repetition", [("rollout/repetition", "rollout")]),
    "cap_share": Panel(
        "share of responses hitting the length cap",
        [("rollout/cap_share", "rollout"), ("eval/cap_share", "validation")],
    ),
    "loss": Panel("loss (SFT / RM)", [("train/loss", "train"), ("eval/loss", "validation")], "step"),
    "accuracy": Panel("pair accuracy (RM)", [("train/accuracy", "train"), ("eval/accuracy", "validation")], "step"),
}

#: Metrics summarised in report.md / report.json (a column only when some run has the key).
SUMMARY_KEYS: list[str] = [
    "objective/scores",
    "objective/gold",
    "objective/kl",
    "rollout/response_length",
    "eval/reward",
    "eval/gold",
    "eval/kl",
    "train/loss",
    "eval/loss",
    "eval/accuracy",
]

_SEED = re.compile(r"^(.+)-seed\d+$")
_NONFINITE_STRINGS = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"}


# ------------------------------------------------------------------------------------------------ reading
def group_label(run_label: str) -> str:
    """The group of a run: its label without a trailing `-seed<digits>`.

    >>> group_label("ppo-vanilla-seed2"), group_label("ppo-max"), group_label("seed3")
    ('ppo-vanilla', 'ppo-max', 'seed3')
    """
    match = _SEED.match(run_label)
    return match.group(1) if match else run_label


def _as_float(value: Any) -> float | None:
    """A metric value as a float: numbers, and the strings MetricsLogger writes for NaN/inf; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _NONFINITE_STRINGS:
        return float(value.strip().lower().replace("infinity", "inf"))
    return None


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `run_dir/metrics.jsonl`. A cut final line (a run still writing, or killed mid-write) is
    dropped; any other malformed line is a DataError naming the file and line."""
    from stages.metrics import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist (expected a stage output directory)")
    if not path.is_file():
        raise ConfigError(f"run directory {run_dir} has no metrics.jsonl (expected {path}; a stage output directory)")
    try:
        rows = read_metrics(path)
    except json.JSONDecodeError:
        lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        rows = []
        for pos, (lineno, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if pos == len(lines) - 1:
                    break  # cut last line
                raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise DataError(f"{path}: row {lineno} is not a JSON object with an integer \"step\"")
    return rows


def run_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """Metric key -> [(step, value)] from the non-event rows, sorted by step. Values may be NaN/inf; a step
    logged twice (resumed run) keeps its last value."""
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        if "event" in row:
            continue
        for key, raw in row.items():
            if key in ("step", "time"):
                continue
            value = _as_float(raw)
            if value is not None:
                by_key.setdefault(key, {})[row["step"]] = value
    return {key: sorted(points.items()) for key, points in by_key.items()}


def count_events(rows: list[dict[str, Any]], name: str) -> int:
    """How many rows are the event `name` (e.g. "monitor": collapse-monitor firings)."""
    return sum(1 for row in rows if row.get("event") == name)


# ----------------------------------------------------------------------------------------------- numerics
def ema(values: list[float], factor: float) -> list[float]:
    """Exponential moving average s_t = factor * s_{t-1} + (1 - factor) * x_t, with s_0 = x_0. Non-finite
    values pass through and do not enter the average. factor 0 returns the values unchanged.

    >>> ema([0.0, 1.0, 1.0], 0.5)
    [0.0, 0.5, 0.75]
    """
    if factor <= 0:
        return list(values)
    out: list[float] = []
    state: float | None = None
    for x in values:
        if not math.isfinite(x):
            out.append(x)
            continue
        state = x if state is None else factor * state + (1.0 - factor) * x
        out.append(state)
    return out


def aggregate(seeds: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at the steps every seed logged with a finite value.
    Returns (steps, mean, low, high); all empty when the seeds share no step.

    >>> aggregate([[(1, 1.0), (2, 2.0)], [(1, 3.0), (3, 9.0)]])
    ([1], [2.0], [1.0], [3.0])
    """
    finite = [{s: v for s, v in series if math.isfinite(v)} for series in seeds]
    common = sorted(set.intersection(*(set(f) for f in finite))) if finite else []
    mean, low, high = [], [], []
    for step in common:
        vals = [f[step] for f in finite]
        mean.append(sum(vals) / len(vals))
        low.append(min(vals))
        high.append(max(vals))
    return common, mean, low, high


def seed_tails(seeds: list[Series], last_common: int) -> list[Series]:
    """Each seed's points from the last step all seeds share on (that step included, so the thin line continues
    the mean), for the seeds that logged past it: a seed stopped early (the monitor, a crash, a shorter run)
    no longer cuts the others' curves off.

    >>> seed_tails([[(1, 1.0), (2, 2.0)], [(1, 3.0), (2, 4.0), (3, 5.0)]], 2)
    [[(2, 4.0), (3, 5.0)]]
    """
    tails = [[(s, v) for s, v in series if s >= last_common and math.isfinite(v)] for series in seeds]
    return [tail for tail in tails if any(s > last_common for s, _ in tail)]


def _mean(values: list[float]) -> float:
    """Mean; NaN when empty or any value is non-finite (a diverged seed is not averaged away)."""
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan
    return sum(values) / len(values)


def series_stats(series: Series) -> dict[str, float]:
    """First and last logged value (NaN/inf kept) and the max over finite values (NaN when none)."""
    finite = [v for _, v in series if math.isfinite(v)]
    return {
        "first": series[0][1] if series else math.nan,
        "last": series[-1][1] if series else math.nan,
        "max": max(finite) if finite else math.nan,
    }


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def fmt(value: float | None) -> str:
    """A number for the Markdown table: 4 significant digits, "n/a" for missing, NaN or inf."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


# ---------------------------------------------------------------------------------------------- the runs
class Run(NamedTuple):
    label: str
    group: str
    path: Path
    series: dict[str, Series]
    monitor_events: int
    last_step: int | None
    critic_only: int = 0  # critic-only iterations before the first policy update


#: x-axis choices of the PPO panels: policy iterations (critic-only ones at <= 0) or logged iterations
X_AXES = ("policy", "iteration")


def critic_only_iterations(series: dict[str, Series], configured: int | None = None,
                           last_step: int | None = None) -> int:
    """C: PPO runs critic-only iterations 1..C before any policy update. The run's own setting (`configured`:
    ppo.critic_pretrain_steps of its resolved_config.yaml), up to its last logged step; without it, the last
    iteration logged with `train/critic_only` = 1, which is C only when every iteration is logged
    (logging.log_every 1); 0 when there is none (vanilla PPO, SFT, RM).

    >>> critic_only_iterations({"train/critic_only": [(1, 1.0), (2, 1.0), (3, 0.0)]})
    2
    >>> critic_only_iterations({"train/critic_only": [(3, 1.0), (6, 0.0)]}, configured=5, last_step=6)
    5
    """
    if configured is not None:
        return min(configured, last_step) if last_step is not None else configured
    return max((step for step, v in series.get("train/critic_only", []) if v == 1.0), default=0)


def configured_critic_only(run_dir: Path) -> int | None:
    """ppo.critic_pretrain_steps of a PPO run's resolved_config.yaml; None when the run has none (another
    stage, or a folder without the file)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "resolved_config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    value = config.get("ppo", {}).get("critic_pretrain_steps") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parent_labels(paths: set[Path]) -> dict[Path, str]:
    """For run folders of one name in different places: the shortest trailing part of each parent folder's
    path that tells them all apart (exp1, exp2; a/exp, b/exp).

    >>> sorted(parent_labels({Path("/r/a/exp"), Path("/r/b/exp")}).values())
    ['a/exp', 'b/exp']
    """
    depth = max(len(p.parts) for p in paths)
    for k in range(1, depth + 1):
        labels = {p: "/".join(p.parts[-k:]) for p in paths}
        if len(set(labels.values())) == len(paths):
            return labels
    return {p: str(p) for p in paths}


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Read every run directory (the same directory given twice counts once). Seeds of one run are folders
    NAME-seedN side by side; runs of the same NAME in different parent folders (exp1/ppo, exp2/ppo) are
    different runs, labelled with as much of the parent's path as tells them apart (parent_labels)."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for given in run_dirs:
        path = Path(given).resolve()
        if path in seen:
            continue
        seen.add(path)
        rows = read_rows(path)
        label = path.name
        steps = [row["step"] for row in rows if "event" not in row]
        series = run_series(rows)
        last = max(steps) if steps else None
        runs.append(Run(label, group_label(label), path, series, count_events(rows, "monitor"), last,
                        critic_only_iterations(series, configured_critic_only(path), last)))
    parents: dict[str, set[Path]] = {}
    for run in runs:
        parents.setdefault(run.group, set()).add(run.path.parent)
    named = {group: parent_labels(found) for group, found in parents.items() if len(found) > 1}
    return [run._replace(label=f"{named[run.group][run.path.parent]}/{run.label}",
                         group=f"{named[run.group][run.path.parent]}/{run.group}")
            if run.group in named else run for run in runs]


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group label -> its runs, groups in the order they first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def summarize(groups: dict[str, list[Run]]) -> dict[str, Any]:
    """Per group: its runs (directory, monitor events, last step), number of seeds, and for each SUMMARY_KEYS
    metric some seed has: first / last / max averaged over the seeds that have it (None when not finite)."""
    out: dict[str, Any] = {}
    for name, runs in groups.items():
        metrics: dict[str, dict[str, Any]] = {}
        for key in SUMMARY_KEYS:
            stats = [series_stats(r.series[key]) for r in runs if r.series.get(key)]
            if stats:
                metrics[key] = {k: _json_number(_mean([s[k] for s in stats])) for k in ("first", "last", "max")}
                metrics[key]["seeds"] = len(stats)
        out[name] = {
            "seeds": len(runs),
            "runs": [{"label": r.label, "dir": str(r.path), "monitor_events": r.monitor_events,
                      "last_step": r.last_step, "critic_only_iterations": r.critic_only} for r in runs],
            "monitor_events": sum(r.monitor_events for r in runs),
            "metrics": metrics,
        }
    return out


# ------------------------------------------------------------------------------------------------- plots
def _curve(run: Run, key: str, smooth: float, x_axis: str = "policy") -> Series:
    """A run's series for plotting: finite points only, EMA-smoothed unless it is a validation (`eval/`) key;
    with x_axis "policy" at x = iteration - C (C = the run's critic-only iterations)."""
    points = run.series.get(key, [])
    if smooth > 0 and not key.startswith("eval/"):
        points = list(zip([s for s, _ in points], ema([v for _, v in points], smooth)))
    shift = run.critic_only if x_axis == "policy" else 0
    return [(s - shift, v) for s, v in points if math.isfinite(v)]


def _xlabel(panel: Panel, runs: list[Run], x_axis: str) -> str:
    """The panel's x-axis name; over policy iterations when some run had critic-only ones."""
    if x_axis == "policy" and panel.xlabel == "iteration" and any(r.critic_only for r in runs):
        return "policy iteration (critic-only pre-training at <= 0)"
    return panel.xlabel


def _draw_panel(ax: Any, panel: Panel, groups: dict[str, list[Run]], colors: dict[str, str], smooth: float,
                legend_size: float, x_axis: str = "policy") -> None:
    """Draw one panel on a matplotlib Axes: a line per (group, metric), min-max band for several seeds."""
    styles = ["-", "--", ":", "-."]
    for i, (key, label) in enumerate(panel.series):
        style = styles[i % len(styles)]
        marker = "o" if key.startswith("eval/") else None
        for name, runs in groups.items():
            curves = [c for c in (_curve(r, key, smooth, x_axis) for r in runs) if c]
            if not curves:
                continue
            legend = f"{name} ({len(curves)} seeds)" if len(curves) > 1 else name
            legend = f"{legend} · {label}" if len(panel.series) > 1 else legend
            kw = {"color": colors[name], "linestyle": style, "marker": marker, "markersize": 3, "linewidth": 1.4}
            if len(curves) == 1:
                ax.plot([s for s, _ in curves[0]], [v for _, v in curves[0]], label=legend, **kw)
                continue
            steps, mean, low, high = aggregate(curves)
            if steps:
                ax.plot(steps, mean, label=legend, **kw)
                ax.fill_between(steps, low, high, color=colors[name], alpha=0.2, linewidth=0)
                for tail in seed_tails(curves, steps[-1]):  # seeds that ran on after the shortest one stopped
                    ax.plot([s for s, _ in tail], [v for _, v in tail], alpha=0.5, **{**kw, "linewidth": 0.8})
            else:  # the seeds share no logged step: draw them one by one
                for j, curve in enumerate(curves):
                    ax.plot([s for s, _ in curve], [v for _, v in curve], label=legend if j == 0 else None,
                            alpha=0.6, **{**kw, "linewidth": 1.0})
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(_xlabel(panel, [r for rs in groups.values() for r in rs], x_axis))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)


def _save(fig: Any, path: Path) -> None:
    """Save a figure as PNG under a temporary name, then rename (no half-written plot left behind)."""
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def plot_panels(groups: dict[str, list[Run]], out_dir: Path, smooth: float = 0.0,
                x_axis: str = "policy") -> list[Path]:
    """Write `<panel>.png` for every PANELS entry some run has a finite value for, and overview.png with all of
    them; returns the paths written (overview last). Uses matplotlib's Agg canvas (no display, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for rs in groups.values() for r in rs]
    present = [name for name, panel in PANELS.items()
               if any(math.isfinite(v) for r in runs for key, _ in panel.series for _, v in r.series.get(key, []))]
    if not present:
        return []
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(groups)}
    written: list[Path] = []
    for name in present:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        _draw_panel(fig.add_subplot(1, 1, 1), PANELS[name], groups, colors, smooth, legend_size=8, x_axis=x_axis)
        path = out_dir / f"{name}.png"
        _save(fig, path)
        written.append(path)
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(present):
        _draw_panel(fig.add_subplot(nrows, ncols, i + 1), PANELS[name], groups, colors, smooth, legend_size=6,
                    x_axis=x_axis)
    if smooth > 0:
        fig.suptitle(f"training curves smoothed (EMA {smooth:g}); validation raw", fontsize=10)
    path = out_dir / "overview.png"
    _save(fig, path)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- markdown
def render_markdown(groups: dict[str, Any], pngs: list[Path], smooth: float, x_axis: str = "policy") -> str:
    """report.md from `summarize`'s groups: a table with one row per group (first / last / max of each summary
    metric, mean over seeds), a table of the runs, and the plots."""
    keys = [k for k in SUMMARY_KEYS if any(k in g["metrics"] for g in groups.values())]
    lines = ["# Training report", ""]
    lines.append("Values are the mean over a group's seeds; first / last are the first and last logged values, "
                 "max the largest finite one. n/a: not logged or not a finite number.")
    lines.append("")
    stat_cols = [f"{k} {stat}" for k in keys for stat in ("first", "last", "max")]
    header = ["group", "seeds", *stat_cols, "monitor events"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for name, g in groups.items():
        cells = [name, str(g["seeds"])]
        for key in keys:
            stats = g["metrics"].get(key, {})
            cells += [fmt(stats.get("first")), fmt(stats.get("last")), fmt(stats.get("max"))]
        cells.append(" / ".join(str(r["monitor_events"]) for r in g["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| run | group | last step | critic-only iterations | monitor events | directory |",
              "|---|---|---:|---:|---:|---|"]
    runs = [r for g in groups.values() for r in g["runs"]]
    for name, g in groups.items():
        for r in g["runs"]:
            step = "n/a" if r["last_step"] is None else str(r["last_step"])
            lines.append(f"| {r['label']} | {name} | {step} | {r['critic_only_iterations']} | {r['monitor_events']} "
                         f"| `{r['dir']}` |")
    if pngs:
        lines += ["", "## Plots", ""]
        if smooth > 0:
            lines += [f"Training curves smoothed with an EMA of factor {smooth:g}; validation curves are raw.", ""]
        if x_axis == "policy" and any(r["critic_only_iterations"] for r in runs):
            lines += ["PPO curves are over policy iterations: a run's critic-only iterations are drawn at x <= 0.", ""]
        for path in pngs:
            lines += [f"![{path.stem}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------- entry
def remove_earlier_plots(out_dir: Path) -> None:
    """Delete the plots an earlier report in `out_dir` listed in its report.json (by name, in out_dir only; other
    files are left alone): a report written over another replaces it whole, rather than leaving panels of other
    runs beside its own."""
    try:
        listed = json.loads((out_dir / "report.json").read_text(encoding="utf-8")).get("png", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in (Path(p).name for p in listed if isinstance(p, str)):
        if name.endswith(".png"):
            (out_dir / name).unlink(missing_ok=True)


def write_report(run_dirs: list[Path], out_dir: Path, smooth: float = 0.0, x_axis: str = "policy") -> dict[str, Any]:
    """Plots and summary of `run_dirs` into `out_dir` (created): one PNG per panel with data, overview.png,
    report.md and report.json. `smooth` in [0, 1) is an EMA factor for the training curves (0: none); `x_axis`
    one of X_AXES (see the module docstring).

    Returns (and writes as report.json) {"png": [paths], "markdown": path, "json": path, "smooth": smooth,
    "x_axis": x_axis, "groups": {group: {"seeds", "runs": [{"label", "dir", "monitor_events", "last_step",
    "critic_only_iterations"}], "monitor_events",
    "metrics": {key: {"first", "last", "max", "seeds"}}}}}; paths are strings, non-finite numbers None.
    Raises DataError when a directory has no metrics.jsonl or no run has a plottable metric."""
    from stages.checkpoint import ensure_dir
    from stages.runtime import atomic_write_text

    if not run_dirs:
        raise ConfigError("no run directories given (expected one or more stage output directories)")
    if not (0.0 <= smooth < 1.0) or not math.isfinite(smooth):
        raise ConfigError(f"smoothing factor {smooth} is out of range (expected 0 <= smooth < 1; 0 = none)")
    if x_axis not in X_AXES:
        raise ConfigError(f"x axis {x_axis!r} is not one of {', '.join(X_AXES)}")
    runs = load_runs(run_dirs)
    groups = group_runs(runs)
    out_dir = Path(out_dir)
    plottable = {key for panel in PANELS.values() for key, _ in panel.series}
    if not any(math.isfinite(v) for r in runs for key in plottable for _, v in r.series.get(key, [])):
        dirs = ", ".join(str(r.path) for r in runs)
        raise DataError(f"no plottable metric in {dirs} (expected some of: {', '.join(sorted(plottable))})")
    ensure_dir(out_dir, "--out")
    remove_earlier_plots(out_dir)
    pngs = plot_panels(groups, out_dir, smooth, x_axis)
    summary = summarize(groups)
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    result = {"png": [str(p) for p in pngs], "markdown": str(md_path), "json": str(json_path), "smooth": smooth,
              "x_axis": x_axis, "groups": summary}
    atomic_write_text(json_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, render_markdown(summary, pngs, smooth, x_axis))
    return result
