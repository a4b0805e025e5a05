"""`stages.report`: plots and summary from hand-written metrics.jsonl files (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from stages.errors import ConfigError, DataError
from stages.report import aggregate, ema, group_label, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root: Path, name: str, rows: list[dict[str, Any]], raw_tail: str = "") -> Path:
    """A run directory with metrics.jsonl holding `rows` (NaN written as the bare JSON token NaN, as Python's
    json does) and optionally a raw extra text at the end."""
    run = root / name
    run.mkdir(parents=True)
    text = "".join(json.dumps({"time": 1795443372.0 + i, **row}) + "\n" for i, row in enumerate(rows))
    (run / "metrics.jsonl").write_text(text + raw_tail, encoding="utf-8")
    return run


def _ppo_rows(scores: list[float], kl: list[float], eval_reward: list[float],
             monitor_at: tuple[int, ...] = ()) -> list[dict]:
    """Training rows at steps 1..n, a validation row every 2 steps, a best and checkpoint event, monitor events."""
    rows: list[dict[str, Any]] = []
    for i, (s, k) in enumerate(zip(scores, kl), 1):
        rows.append({"step": i, "objective/scores": s, "objective/kl": k, "rollout/response_length": 10.0 + i,
                     "policy/clipfrac": 0.1, "val/clipfrac": 0.2, "monitor/firing": 0.0})
        if i in monitor_at:
            rows.append({"step": i, "event": "monitor", "reasons": ["length"], "action": "warn"})
        if i % 2 == 0:
            rows.append({"step": i, "eval/reward": eval_reward[i // 2 - 1], "eval/response_length": 9.0})
            rows.append({"step": i, "event": "best", "eval_reward": eval_reward[i // 2 - 1]})
    rows.append({"step": len(scores), "event": "checkpoint", "path": "/x"})
    return rows


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Two seeds of ppo-vanilla (objective/scores last 1.0 and 3.0) and one ppo-max run with a NaN KL at the end."""
    root = tmp_path / "runs"
    return [
        _write_run(root, "ppo-vanilla-seed1",
                   _ppo_rows([0.0, 0.5, 1.5, 1.0], [0.0, 0.1, 0.2, 0.3], [0.2, 0.4], monitor_at=(3,))),
        _write_run(root, "ppo-vanilla-seed2",
                   _ppo_rows([2.0, 2.5, 2.0, 3.0], [0.0, 0.3, 0.4, 0.5], [0.6, 0.8], monitor_at=(2, 4))),
        _write_run(root, "ppo-max", _ppo_rows([1.0, 1.2, 1.4, 1.6], [0.0, 0.1, 0.2, math.nan], [0.5, 0.7])),
    ]


def _table_rows(md: str) -> dict[str, list[str]]:
    """The first Markdown table's body rows as {first cell: cells}, plus "header"."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    out = {"header": cells[0]}
    for row in cells[2:]:
        if row[0] == "run":  # the second table starts
            break
        out[row[0]] = row
    return out


def _assert_no_nan_text(table: dict[str, list[str]]) -> None:
    """No value cell of the group table reads like nan / inf."""
    for name, cells in table.items():
        if name != "header":
            for cell in cells[1:]:
                assert "nan" not in cell.lower() and "inf" not in cell.lower(), (name, cell)


def test_write_report_files_and_summary(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = write_report(runs, out)

    names = {Path(p).name for p in result["png"]}
    assert {"reward.png", "kl.png", "response_length.png", "clipfrac.png", "overview.png"} <= names
    assert "gold_reward.png" not in names and "perplexity.png" not in names and "loss.png" not in names
    for p in result["png"]:
        data = Path(p).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
        assert Path(p).parent == out

    md = (out / "report.md").read_text(encoding="utf-8")
    table = _table_rows(md)
    header = table["header"]
    assert set(table) == {"header", "ppo-vanilla", "ppo-max"}  # one row per group, seeds stripped
    col = {name: i for i, name in enumerate(header)}
    vanilla, ppo_max = table["ppo-vanilla"], table["ppo-max"]
    assert vanilla[col["seeds"]] == "2" and ppo_max[col["seeds"]] == "1"
    # mean over seeds: first (0.0 + 2.0) / 2, last (1.0 + 3.0) / 2, max (1.5 + 3.0) / 2
    assert vanilla[col["objective/scores first"]] == "1"
    assert vanilla[col["objective/scores last"]] == "2"
    assert vanilla[col["objective/scores max"]] == "2.25"
    assert vanilla[col["objective/kl last"]] == "0.4"
    assert vanilla[col["eval/reward first"]] == "0.4" and vanilla[col["eval/reward last"]] == "0.6"
    assert ppo_max[col["objective/scores last"]] == "1.6"
    # the NaN KL of ppo-max is its last value: n/a, never "nan"; its max is over the finite values
    assert ppo_max[col["objective/kl last"]] == "n/a"
    assert ppo_max[col["objective/kl max"]] == "0.2"
    _assert_no_nan_text(table)
    # only columns some run has; monitor events per run
    assert not any(h.startswith(("objective/gold", "eval/loss", "train/loss")) for h in header)
    assert vanilla[col["monitor events"]] == "1 / 2" and ppo_max[col["monitor events"]] == "0"
    for name in names:
        assert f"]({name})" in md

    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved == result
    groups = result["groups"]
    assert groups["ppo-vanilla"]["metrics"]["objective/scores"]["last"] == pytest.approx(2.0)
    assert groups["ppo-max"]["metrics"]["objective/kl"]["last"] is None
    assert [r["label"] for r in groups["ppo-vanilla"]["runs"]] == ["ppo-vanilla-seed1", "ppo-vanilla-seed2"]
    assert [r["monitor_events"] for r in groups["ppo-vanilla"]["runs"]] == [1, 2]
    assert groups["ppo-vanilla"]["runs"][0]["last_step"] == 4


def test_nan_as_logged_by_metrics_logger_and_smoothing(tmp_path: Path) -> None:
    """MetricsLogger writes NaN/inf as strings; they read as non-finite. Smoothing still writes plots, and the
    summary stays raw (unsmoothed)."""
    run = _write_run(tmp_path, "sft-seed0", [
        {"step": 10, "train/loss": 4.0},
        {"step": 20, "train/loss": "nan"},
        {"step": 20, "eval/loss": "inf", "eval/perplexity": 3.0},
        {"step": 30, "train/loss": 2.0},
        {"step": 30, "event": "final", "path": "/x"},
    ])
    result = write_report([run], tmp_path / "out", smooth=0.9)
    assert {Path(p).name for p in result["png"]} == {"loss.png", "overview.png"}
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    table = _table_rows(md)
    col = {name: i for i, name in enumerate(table["header"])}
    row = table["sft"]
    assert row[col["train/loss first"]] == "4" and row[col["train/loss last"]] == "2"
    assert row[col["train/loss max"]] == "4"
    assert row[col["eval/loss first"]] == "n/a" and row[col["eval/loss max"]] == "n/a"
    _assert_no_nan_text(table)


def test_missing_metrics_raises_naming_dir(runs: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "runs" / "ppo-broken"
    empty.mkdir()
    with pytest.raises(ConfigError, match="ppo-broken has no metrics.jsonl") as exc:  # a usage error: exit 2
        write_report([*runs, empty], tmp_path / "out")
    assert exc.value.exit_code == 2
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ConfigError, match="does-not-exist"):
        write_report([tmp_path / "does-not-exist"], tmp_path / "out")


def test_no_plottable_metric_raises(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "odd", [{"step": 1, "perf/iteration_s": 1.0}, {"step": 1, "event": "final"}])
    with pytest.raises(DataError, match="no plottable metric.*odd"):
        write_report([run], tmp_path / "out")


def test_bad_lines(tmp_path: Path) -> None:
    """A cut final line (a run being written) is dropped; a broken line in the middle names file and line."""
    run = _write_run(tmp_path, "ppo-live", [{"step": 1, "objective/scores": 1.0}], raw_tail='{"step": 2, "obj')
    result = write_report([run], tmp_path / "out")
    assert result["groups"]["ppo-live"]["metrics"]["objective/scores"]["last"] == 1.0
    bad = _write_run(tmp_path, "ppo-bad", [{"step": 1, "objective/scores": 1.0}],
                     raw_tail='not json\n{"step": 3, "objective/scores": 2.0}\n')
    with pytest.raises(DataError, match=r"ppo-bad.*line 2"):
        write_report([bad], tmp_path / "out2")


def test_smooth_out_of_range(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="smooth"):
        write_report(runs, tmp_path / "out", smooth=1.0)
    with pytest.raises(ConfigError, match="no run directories given"):
        write_report([], tmp_path / "out")


def test_group_label() -> None:
    assert group_label("ppo-vanilla-seed2") == "ppo-vanilla"
    assert group_label("ppo-max-seed10") == "ppo-max"
    assert group_label("ppo-max") == "ppo-max"
    assert group_label("seed3") == "seed3"
    assert group_label("ppo-seed1-long") == "ppo-seed1-long"


def test_runs_of_the_same_name_in_different_folders_are_not_seeds_of_one(tmp_path: Path) -> None:
    from stages.report import group_runs, load_runs

    a = _write_run(tmp_path / "exp1", "ppo", _ppo_rows([1.0, 1.0], [0.0, 0.0], [1.0]))
    b = _write_run(tmp_path / "exp2", "ppo", _ppo_rows([5.0, 5.0], [0.0, 0.0], [5.0]))
    s1 = _write_run(tmp_path / "exp1", "van-seed1", _ppo_rows([2.0, 2.0], [0.0, 0.0], [2.0]))
    s2 = _write_run(tmp_path / "exp1", "van-seed2", _ppo_rows([3.0, 3.0], [0.0, 0.0], [3.0]))
    groups = group_runs(load_runs([a, b, s1, s2]))
    assert {k: [r.label for r in v] for k, v in groups.items()} == {
        "exp1/ppo": ["exp1/ppo"], "exp2/ppo": ["exp2/ppo"], "van": ["van-seed1", "van-seed2"]}
    # parents of one name (a/exp/ppo, b/exp/ppo): as much of their path as tells them apart, never merged
    c = _write_run(tmp_path / "a" / "exp", "ppo", _ppo_rows([1.0, 1.0], [0.0, 0.0], [1.0]))
    d = _write_run(tmp_path / "b" / "exp", "ppo", _ppo_rows([5.0, 5.0], [0.0, 0.0], [5.0]))
    groups = group_runs(load_runs([c, d]))
    assert {k: [r.label for r in v] for k, v in groups.items()} == {"a/exp/ppo": ["a/exp/ppo"],
                                                                      "b/exp/ppo": ["b/exp/ppo"]}


def test_ema_and_aggregate() -> None:
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert ema([0.0, 1.0, 1.0], 0.5) == [0.0, 0.5, 0.75]
    smoothed = ema([0.0, math.nan, 1.0], 0.5)
    assert smoothed[0] == 0.0 and math.isnan(smoothed[1]) and smoothed[2] == 0.5
    # mean and min-max band only over steps every seed has (a NaN step drops out)
    steps, mean, low, high = aggregate([[(1, 1.0), (2, 2.0), (3, math.nan)], [(1, 3.0), (2, 4.0), (3, 5.0), (4, 1.0)]])
    assert steps == [1, 2] and mean == [2.0, 3.0] and low == [1.0, 2.0] and high == [3.0, 4.0]
    assert aggregate([[(1, 1.0)], [(2, 1.0)]]) == ([], [], [], [])


def test_ppo_curves_line_up_at_policy_iterations(tmp_path: Path) -> None:
    """PPO-max's critic-only iterations (train/critic_only = 1) are drawn at x <= 0 by default, so its first
    policy update sits at x = 1 like vanilla's; --x-axis iteration keeps the logged steps."""
    from matplotlib.figure import Figure

    from stages.report import PANELS, _draw_panel, group_runs, load_runs

    vanilla = _write_run(tmp_path, "vanilla", [{"step": s, "objective/scores": float(s)} for s in range(1, 5)])
    with_critic = _write_run(tmp_path, "max", [
        {"step": s, "train/critic_only": float(s <= 2), "objective/scores": 10.0 + s} for s in range(1, 7)])
    groups = group_runs(load_runs([vanilla, with_critic]))
    assert [r.critic_only for rs in groups.values() for r in rs] == [0, 2]
    for x_axis, max_x, xlabel in (("policy", [-1, 0, 1, 2, 3, 4], "policy iteration (critic-only pre-training at <= 0)"),
                                  ("iteration", [1, 2, 3, 4, 5, 6], "iteration")):
        ax = Figure().add_subplot()
        _draw_panel(ax, PANELS["reward"], groups, {"vanilla": "C0", "max": "C1"}, 0.0, 6, x_axis)
        xs = {line.get_label(): [int(x) for x in line.get_xdata()] for line in ax.get_lines()}
        assert xs == {"vanilla · rollout": [1, 2, 3, 4], "max · rollout": max_x}, x_axis
        assert ax.get_xlabel() == xlabel

    result = write_report([vanilla, with_critic], tmp_path / "report")
    assert result["x_axis"] == "policy"
    assert [r["critic_only_iterations"] for g in result["groups"].values() for r in g["runs"]] == [0, 2]
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "| max | max | 6 | 2 | 0 |" in md and "critic-only iterations are drawn at x <= 0" in md
    md_iter = write_report([vanilla, with_critic], tmp_path / "r2", x_axis="iteration")["markdown"]
    assert "drawn at x <= 0" not in Path(md_iter).read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="x axis 'steps' is not one of policy, iteration"):
        write_report([vanilla], tmp_path / "r3", x_axis="steps")


def test_critic_only_iterations_come_from_the_runs_config_when_not_every_iteration_is_logged(tmp_path: Path) -> None:
    """logging.log_every 3 with 20 critic-only iterations: the last row logged as critic-only is step 18, but
    the run's resolved_config.yaml says 20, so its first policy update (21) is drawn at x = 1, as vanilla's."""
    import yaml

    from stages.report import load_runs

    run = _write_run(tmp_path, "max", [{"step": s, "train/critic_only": float(s <= 20), "objective/scores": 1.0}
                                       for s in range(3, 31, 3)])
    assert load_runs([run])[0].critic_only == 18  # no config: the logged rows are all it has
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"ppo": {"critic_pretrain_steps": 20}}))
    assert load_runs([run])[0].critic_only == 20
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"ppo": {"critic_pretrain_steps": 50}}))
    assert load_runs([run])[0].critic_only == 30  # a run stopped during critic pre-training: up to its last step


def test_a_seed_that_ran_on_after_the_shortest_is_drawn_past_the_mean(tmp_path: Path) -> None:
    """Seed 1 stopped at iteration 3 (say, the monitor), seed 2 ran to 5: the mean and band cover 1-3 and seed 2
    goes on as a thin unlabelled line from 3 to 5."""
    from matplotlib.figure import Figure

    from stages.report import PANELS, _draw_panel, group_runs, load_runs

    short = _write_run(tmp_path, "van-seed1", [{"step": s, "objective/scores": 1.0} for s in range(1, 4)])
    long = _write_run(tmp_path, "van-seed2", [{"step": s, "objective/scores": float(s)} for s in range(1, 6)])
    ax = Figure().add_subplot()
    _draw_panel(ax, PANELS["reward"], group_runs(load_runs([short, long])), {"van": "C0"}, 0.0, 6)
    lines = [(line.get_label(), line.get_xdata().tolist(), line.get_ydata().tolist()) for line in ax.get_lines()]
    assert lines[0] == ("van (2 seeds) · rollout", [1, 2, 3], [1.0, 1.5, 2.0])
    assert lines[1][1:] == ([3, 4, 5], [3.0, 4.0, 5.0]) and lines[1][0].startswith("_")
    assert len(lines) == 2


def test_the_eval_table_keeps_the_tie_share_out_of_the_baseline_column():
    """The tie share sat in the baseline column, where it read as the baseline's score."""
    import io

    from rich.console import Console

    from stages.evaluate import print_results

    buf = io.StringIO()
    results = {"prompts": 64, "seed": 0, "policy_metrics": {"reward": 1.25}, "baseline_metrics": {"reward": 0.5},
               "win_rate_rm": {"win_rate": 0.56, "wins": 0.23, "ties": 0.66, "losses": 0.11, "nonfinite": 0}}
    print_results(results, Console(file=buf, width=120))
    row = next(line for line in buf.getvalue().splitlines() if "win-rate" in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]  # (the table's outer borders dropped)
    assert cells == ["win-rate vs baseline (rm; ties 0.66)", "0.560", ""], cells


def test_a_report_over_an_earlier_one_removes_the_plots_it_no_longer_has(runs: list[Path], tmp_path: Path) -> None:
    """`rlhf report runs/demo/sft` writes to runs/demo/report, where the pipeline's PPO report is: its reward and
    KL plots stayed beside the SFT loss plot. Files the earlier report did not list stay."""
    out = tmp_path / "out"
    ppo_pngs = {Path(p).name for p in write_report(runs, out)["png"]}
    (out / "notes.png").write_text("mine")
    sft = _write_run(tmp_path, "sft-seed0", [{"step": 10, "train/loss": 4.0}, {"step": 20, "train/loss": 2.0}])
    sft_pngs = {Path(p).name for p in write_report([sft], out)["png"]}
    assert {"loss.png", "overview.png"} == sft_pngs and "kl.png" in ppo_pngs
    assert {p.name for p in out.glob("*.png")} == sft_pngs | {"notes.png"}


# ----------------------------------------------------------------------------------- units (mutation audit)
def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_group_label_needs_digits_after_seed() -> None:
    """Only `-seed<digits>` is a seed suffix: `-seed` alone, or a suffix inside the name, is part of the label."""
    assert group_label("ppo-seed") == "ppo-seed"
    assert group_label("ppo-seed01") == "ppo"
    assert group_label("ppo-seedx") == "ppo-seedx"


def test_run_series_reads_values_as_the_metrics_logger_writes_them() -> None:
    """Numbers and the non-finite strings (any case, padded) are points; booleans, other strings, `time` and
    event rows are not; a step logged twice keeps its last value."""
    from stages.report import run_series

    rows = [
        {"step": 1, "time": 5.0, "a": 1, "b": True, "c": "NaN", "d": "-Infinity", "e": " inf ", "f": "x"},
        {"step": 2, "a": 2.0},
        {"step": 2, "a": 3.0},  # a resumed run logged step 2 again
        {"step": 3, "event": "final", "a": 99.0},
    ]
    series = run_series(rows)
    assert set(series) == {"a", "c", "d", "e"}
    assert series["a"] == [(1, 1.0), (2, 3.0)]
    assert [s for s, _ in series["c"]] == [1] and math.isnan(series["c"][0][1])
    assert series["d"] == [(1, -math.inf)] and series["e"] == [(1, math.inf)]


def test_read_rows_rejects_a_boolean_step(tmp_path: Path) -> None:
    """`"step": true` is a JSON boolean, not an integer step (Python's bool is an int): the row is named."""
    from stages.report import read_rows

    run = _write_run(tmp_path, "r", [{"step": 1, "objective/scores": 1.0}, {"step": True, "objective/scores": 2.0}])
    with pytest.raises(DataError, match=r"row 2 is not a JSON object with an integer \"step\""):
        read_rows(run)


def test_ema_weights_the_previous_state_by_the_factor() -> None:
    """s_t = factor * s_{t-1} + (1 - factor) * x_t: with 0.9 a jump from 0 to 1 moves the average by 0.1."""
    assert ema([0.0, 1.0, 1.0], 0.9) == pytest.approx([0.0, 0.1, 0.19])


def test_series_stats_and_fmt() -> None:
    """max is over the finite values only (an inf is not the max); first/last keep what was logged; a one-point
    series has that point as first and last. fmt: 4 significant digits, n/a for None, NaN and inf."""
    from stages.report import fmt, series_stats

    stats = series_stats([(1, 1.0), (2, math.inf), (3, 2.0), (4, math.nan)])
    assert stats["first"] == 1.0 and math.isnan(stats["last"]) and stats["max"] == 2.0
    assert series_stats([(7, 0.5)]) == {"first": 0.5, "last": 0.5, "max": 0.5}
    assert all(math.isnan(v) for v in series_stats([]).values())
    assert fmt(1.23456) == "1.235" and fmt(12345.6) == "1.235e+04" and fmt(2.0) == "2"
    assert fmt(None) == fmt(math.nan) == fmt(math.inf) == fmt(-math.inf) == "n/a"


@pytest.mark.parametrize("text, expected", [("ppo: {critic_pretrain_steps: 3}\n", 3),
                                            ("ppo: {critic_pretrain_steps: 0}\n", 0),
                                            ("ppo: {critic_pretrain_steps: -1}\n", None),
                                            ("ppo: {critic_pretrain_steps: true}\n", None),
                                            ("ppo: {critic_pretrain_steps: 2.5}\n", None),
                                            ("[1, 2]\n", None), ("sft: {}\n", None)])
def test_configured_critic_only_takes_only_a_count(tmp_path: Path, text: str, expected: int | None) -> None:
    """Only a non-negative integer in resolved_config.yaml is the run's critic-only count (a bool is not)."""
    from stages.report import configured_critic_only

    (tmp_path / "resolved_config.yaml").write_text(text, encoding="utf-8")
    assert configured_critic_only(tmp_path) == expected
    assert configured_critic_only(tmp_path / "nowhere") is None


def test_report_summary_columns_counts_and_layout(tmp_path: Path) -> None:
    """Two seeds of `van` (only seed 1 validated; seed 2 has a late event row and a KL), an SFT run with a
    perplexity that is only NaN and one eval/loss point, and a run with no metric rows; seed 1 given twice."""
    root = tmp_path / "runs"
    s1 = _write_run(root, "van-seed1", [
        {"step": 1, "objective/scores": 1.0}, {"step": 2, "objective/scores": 2.0},
        {"step": 2, "eval/reward": 0.5}, {"step": 3, "objective/scores": 3.0},
        {"step": 3, "event": "monitor", "reasons": ["kl"]}])
    s2 = _write_run(root, "van-seed2", [
        {"step": 1, "objective/scores": 1.0, "objective/kl": 0.1}, {"step": 2, "objective/scores": 1.5},
        {"step": 3, "objective/scores": 2.2345678}, {"step": 2, "event": "monitor"}, {"step": 3, "event": "monitor"},
        {"step": 9, "event": "final", "path": "/x"}])
    sft = _write_run(root, "sft", [{"step": 10, "train/loss": 4.0, "rollout/perplexity": "nan"},
                                   {"step": 20, "train/loss": 2.0}, {"step": 20, "eval/loss": 3.0}])
    empty = _write_run(root, "empty", [{"step": 0, "event": "start"}])
    out = tmp_path / "rep"
    result = write_report([s1, s2, sft, empty, s1], out, smooth=0.5)

    groups = result["groups"]
    assert list(groups) == ["van", "sft", "empty"]
    van = groups["van"]
    assert van["seeds"] == 2 and [r["label"] for r in van["runs"]] == ["van-seed1", "van-seed2"]
    assert van["monitor_events"] == 3 and [r["monitor_events"] for r in van["runs"]] == [1, 2]
    assert [r["last_step"] for r in van["runs"]] == [3, 3]  # the event at step 9 is no logged step
    assert van["metrics"]["objective/scores"]["seeds"] == 2 and van["metrics"]["eval/reward"]["seeds"] == 1
    assert van["metrics"]["objective/scores"]["last"] == pytest.approx((3.0 + 2.2345678) / 2)
    assert groups["sft"]["metrics"]["eval/loss"] == {"first": 3.0, "last": 3.0, "max": 3.0, "seeds": 1}
    assert groups["empty"]["runs"][0]["last_step"] is None and groups["empty"]["metrics"] == {}
    # a panel whose only values are NaN is not drawn; 3 panels: the overview is one row of 3 (5.5 x 3.8 in, dpi 100)
    assert [Path(p).name for p in result["png"]] == ["reward.png", "kl.png", "loss.png", "overview.png"]
    assert _png_size(out / "overview.png") == (1650, 380)

    md = (out / "report.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    table = _table_rows(md)
    header = table["header"]
    # a column for every summary key some group has, in SUMMARY_KEYS order; n/a where a group lacks it
    assert header == ["group", "seeds"] + [f"{k} {s}" for k in ("objective/scores", "objective/kl", "eval/reward",
                                                                 "train/loss", "eval/loss")
                                           for s in ("first", "last", "max")] + ["monitor events"]
    assert lines[lines.index("| " + " | ".join(header) + " |") + 1] == "|---|---|" + "---:|" * (len(header) - 2)
    assert table["van"] == ["van", "2", "1", "2.617", "2.617", "0.1", "0.1", "0.1", "0.5", "0.5", "0.5",
                            "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "1 / 2"]
    assert table["sft"][1:2] + table["sft"][-7:] == ["1", "4", "2", "4", "3", "3", "3", "0"]
    assert f"| empty | empty | n/a | 0 | 0 | `{empty}` |" in lines
    assert "Training curves smoothed with an EMA of factor 0.5; validation curves are raw." in lines


def test_curves_smooth_training_keys_only_and_labels(tmp_path: Path) -> None:
    """Validation (`eval/`) curves stay raw under smoothing; the step panels (loss) keep their "step" axis when a
    run had critic-only iterations; a one-metric panel's legend is the group alone."""
    from matplotlib.figure import Figure

    from stages.report import PANELS, Run, _curve, _draw_panel, _xlabel

    series = {"objective/scores": [(1, 0.0), (2, 1.0)], "eval/reward": [(2, 0.0), (4, 1.0)],
              "rollout/perplexity": [(1, 5.0), (2, 6.0)]}
    run = Run("r", "r", tmp_path, series, 0, 4, 0)
    assert _curve(run, "objective/scores", 0.5) == [(1, 0.0), (2, 0.5)]
    assert _curve(run, "eval/reward", 0.5) == [(2, 0.0), (4, 1.0)]
    critic = run._replace(critic_only=2)
    assert _xlabel(PANELS["loss"], [run, critic], "policy") == "step"
    assert _xlabel(PANELS["reward"], [run, critic], "policy").startswith("policy iteration")
    assert _xlabel(PANELS["reward"], [run, critic], "iteration") == "iteration"
    ax = Figure().add_subplot()
    _draw_panel(ax, PANELS["perplexity"], {"van": [run, run._replace(label="r2")], "one": [run]},
                {"van": "C0", "one": "C1"}, 0.0, 6)
    assert [line.get_label() for line in ax.get_lines()] == ["van (2 seeds)", "one"]


def test_remove_earlier_plots_only_deletes_listed_pngs_in_the_out_dir(tmp_path: Path) -> None:
    """A report.json listing a PNG elsewhere (by full path) or a non-PNG file deletes neither; a report.json that
    is not a mapping is ignored."""
    from stages.report import remove_earlier_plots

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for path in (out / "old.png", out / "notes.txt", elsewhere / "keep.png"):
        path.write_text("x")
    (out / "report.json").write_text(json.dumps({"png": [str(out / "old.png"), str(elsewhere / "keep.png"),
                                                          "notes.txt", 5]}))
    remove_earlier_plots(out)
    assert not (out / "old.png").exists()
    assert (out / "notes.txt").exists() and (elsewhere / "keep.png").exists()
    (out / "report.json").write_text("[1, 2]")
    remove_earlier_plots(out)  # no AttributeError
    (out / "report.json").write_text("{not json")
    remove_earlier_plots(out)


def test_a_negative_smoothing_factor_is_refused(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"smoothing factor -0.1 is out of range \(expected 0 <= smooth < 1"):
        write_report(runs, tmp_path / "out", smooth=-0.1)
    assert not (tmp_path / "out").exists()
