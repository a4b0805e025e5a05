"""Unit pins for `stages.metrics`, `stages.rendering` and `stages.yamlio` found by a mutation audit: each test
fails on one or more hand-made mutants of those modules that the existing tests let through. Fast, no model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stages.metrics import MetricsLogger, TrainProgress, json_safe, keep_rows_upto, print_summary, read_metrics, say
from stages.rendering import (check_rendering, data_rendering, read_rendering, rendering_mismatches,
                              rendering_record, template_digest)
from stages.yamlio import dump_yaml, load_yaml


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------- metrics
def test_json_safe_stringifies_non_finite_floats_inside_dicts_and_lists() -> None:
    """json_safe: nan/inf/-inf become "nan"/"inf"/"-inf" at any depth; finite numbers and bools stay."""
    value = {"a": [1.5, float("inf"), {"b": float("-inf")}], "c": float("nan"), "d": 2, "e": True}
    assert json_safe(value) == {"a": [1.5, "inf", {"b": "-inf"}], "c": "nan", "d": 2, "e": True}


def test_a_logged_row_is_strict_json_starting_with_step_and_time(tmp_path: Path) -> None:
    """log: one line per row, "step" then "time" first, non-finite values as strings (jq reads it)."""
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.log(3, {"train/loss": float("nan"), "train/lr": float("inf"), "n": 1})
    line, = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert line.startswith('{"step": 3, "time": ')
    row = json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token} in the file"))
    assert list(row) == ["step", "time", "train/loss", "train/lr", "n"]
    assert (row["train/loss"], row["train/lr"], row["n"]) == ("nan", "inf", 1)


def test_a_fresh_run_empties_an_old_metrics_file(tmp_path: Path) -> None:
    """Without resume_step the logger starts metrics.jsonl empty (an earlier run's rows are not appended to)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "x": 1}\n', encoding="utf-8")
    MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == ""


def test_resuming_from_step_zero_keeps_the_rows_of_step_zero(tmp_path: Path) -> None:
    """resume_step=0 is a resume (rows up to step 0 kept), not a fresh start."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x": 2}\n', encoding="utf-8")
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=0)
    assert path.read_text(encoding="utf-8") == '{"step": 0, "x": 1}\n'


def test_a_disabled_logger_touches_no_file(tmp_path: Path) -> None:
    """enabled=False (ranks other than 0): no metrics.jsonl is created or written."""
    logger = MetricsLogger(tmp_path, enabled=False, tensorboard=False)
    logger.log(1, {"x": 1.0})
    logger.event(1, "final")
    assert not (tmp_path / "metrics.jsonl").exists()


class _FakeWriter:
    """Stands in for torch's SummaryWriter: records its arguments and scalars."""

    made: list["_FakeWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []
        _FakeWriter.made.append(self)

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.scalars.append((key, value, step))

    def close(self) -> None:
        pass


def test_tensorboard_purges_after_the_resume_step_and_gets_numbers_only(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard: purge_step is resume_step + 1 (None when fresh); only int/float values (not bools, not text)
    are added as scalars at their step."""
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.made.clear()
    MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True, resume_step=4)
    assert [w.purge_step for w in _FakeWriter.made] == [None, 5]
    assert _FakeWriter.made[1].log_dir == str(tmp_path / "tensorboard")
    logger.log(5, {"a/x": 0.5, "a/n": 2, "a/flag": True, "event": "checkpoint"})
    assert _FakeWriter.made[1].scalars == [("a/x", 0.5, 5), ("a/n", 2, 5)]


def test_tensorboard_keeps_the_last_scalars_of_a_run_that_fails(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A run ending on an error (an exit without the stage's close): the scalars logged before it reach the event
    file (SummaryWriter holds them up to flush_secs = 120 s; without a close at exit they were lost, or not, as
    the interpreter's end happened to finalize the writer: the last steps before a crash). The writer's close is
    registered to run at exit; a real writer's process, failing, leaves its scalar in the file."""
    import atexit

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    registered: list[Any] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    assert registered == [logger.writer.close]
    monkeypatch.undo()

    code = ("import sys; from pathlib import Path; from stages.metrics import MetricsLogger; "
            f"m = MetricsLogger(Path({str(tmp_path)!r}), enabled=True, tensorboard=True); "
            "m.log(3, {'train/loss': 1.25}); sys.exit('failed')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == "failed", res.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 1.25)]


def test_keep_rows_upto_keeps_rows_without_the_key(tmp_path: Path) -> None:
    """A row lacking the key counts as step 0: kept."""
    path = tmp_path / "samples.jsonl"
    path.write_text('{"note": "header"}\n{"iteration": 3}\n', encoding="utf-8")
    keep_rows_upto(path, "iteration", 2)
    assert path.read_text(encoding="utf-8") == '{"note": "header"}\n'


def test_keep_rows_upto_does_nothing_without_a_file(tmp_path: Path) -> None:
    """No file: no error and no file created (a resume before anything was logged)."""
    keep_rows_upto(tmp_path / "none.jsonl", "step", 2)
    assert not (tmp_path / "none.jsonl").exists()


def test_read_metrics_skips_blank_lines(tmp_path: Path) -> None:
    """read_metrics: blank or whitespace-only lines are not rows."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n  \n{"step": 2}\n', encoding="utf-8")
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_plain_progress_prints_every_nth_step_and_the_last_formatted(capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal: a line at steps divisible by print_every and at the total; lr as .2e, tok/s with thousands
    separators, others .4f, two spaces between."""
    progress = TrainProgress(True, total=5, start=0, description="sft", print_every=2, unit="iteration")
    for step in range(1, 6):
        progress.update(step, {"loss": 0.5, "lr": 1e-4, "gen tok/s": 12345.6}, "(critic only)" if step == 2 else "")
    progress.close()
    line = "{}/5  loss 0.5000  lr 1.00e-04  gen tok/s 12,346"
    assert capsys.readouterr().out.splitlines() == [f"iteration {line.format(2)}  (critic only)"] + [
        f"iteration {line.format(s)}" for s in (4, 5)]  # (a note after the stats, when given)


def test_disabled_progress_and_say_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """Rank != 0: TrainProgress.update/print and say are silent; enabled say renders markup."""
    progress = TrainProgress(False, total=2, start=0, description="sft")
    progress.update(2, {"loss": 1.0})
    progress.print("x")
    say(False, "hidden")
    assert capsys.readouterr().out == ""
    say(True, "[bold]shown[/bold]")
    assert capsys.readouterr().out == "shown\n"


def _table_rows(out: str) -> list[list[str]]:
    """The body rows of a rich table (the header row uses the heavy bar ┃)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 4]


def test_print_summary_shows_first_and_last_of_each_slashed_metric(capsys: pytest.CaptureFixture[str]) -> None:
    """Summary: sorted "group/name" metrics only (no step/time, no tokens_seen/epoch), first and last value with
    their steps; the final model's path, or that it was not saved."""
    rows: list[dict[str, Any]] = [
        {"step": 1, "time": 10.0, "train/loss": 2.0, "train/tokens_seen": 100, "train/epoch": 0.5},
        {"step": 2, "time": 11.0, "eval/loss": 1.5},
        {"step": 3, "time": 12.0, "train/loss": 1.0, "event": "checkpoint"},
        {"step": 4, "time": 13.0, "train/loss": 0.25},
    ]
    print_summary("T", rows, None)
    out = capsys.readouterr().out
    assert _table_rows(out) == [["eval/loss", "1.5 (2)", "1.5 (2)"], ["train/loss", "2 (1)", "0.25 (4)"]]
    assert out.splitlines()[-1] == "final model: not saved (train.checkpoints: false)"
    print_summary("T", rows, Path("/runs/x/final"))
    assert capsys.readouterr().out.splitlines()[-1] == "final model: /runs/x/final"


# ----------------------------------------------------------------------------------------- rendering
def test_an_empty_chat_template_has_no_digest() -> None:
    """template_digest: "" or {} (no template) is None, like a missing one."""
    assert template_digest(SimpleNamespace(chat_template="")) is None
    assert template_digest(SimpleNamespace(chat_template={})) is None


def test_named_templates_hash_as_sorted_json_whatever_their_order() -> None:
    """Several named templates: sha256 of their JSON with sorted keys, so insertion order does not matter."""
    one = SimpleNamespace(chat_template={"tool_use": "b", "default": "a"})
    two = SimpleNamespace(chat_template={"default": "a", "tool_use": "b"})
    assert template_digest(one) == template_digest(two) == _sha('{"default": "a", "tool_use": "b"}')


def test_rendering_record_lists_styles_sorted_and_once() -> None:
    """rendering_record: styles deduplicated and sorted; chat used, so the template's digest."""
    tok = SimpleNamespace(chat_template="t")
    assert rendering_record(["raw_pr", "chat", "raw_hh", "chat"], tok) == {
        "styles": ["chat", "raw_hh", "raw_pr"], "chat_template_sha256": _sha("t")}


def test_data_rendering_takes_add_eos_and_special_token_reading_from_the_data_section() -> None:
    """data_rendering: data.add_eos goes to "add_eos", data.content_special_tokens to "content_special_tokens"."""
    tok = SimpleNamespace(chat_template="t")
    data = SimpleNamespace(add_eos=False, content_special_tokens="control")
    assert data_rendering(["chat"], tok, data) == {"styles": ["chat"], "chat_template_sha256": _sha("t"),
                                                   "add_eos": False, "content_special_tokens": "control"}


@pytest.mark.parametrize("meta", ["[1, 2]", '{"rendering": {"add_eos": true}}', '{"rendering": {"styles": "chat"}}',
                                  '{"rendering": ["chat"]}'])
def test_read_rendering_ignores_a_record_that_is_not_a_dict_with_a_styles_list(tmp_path: Path, meta: str) -> None:
    """read_rendering: a file that parses but holds no {"styles": [...]} record gives None (not checked)."""
    (tmp_path / "rlhf_checkpoint.json").write_text(meta, encoding="utf-8")
    assert read_rendering(str(tmp_path)) is None


def test_rendering_mismatch_names_the_styles_sorted() -> None:
    """The style list in a mismatch line is in sorted style order (chat, raw_hh, raw_pr), joined by "and"."""
    tok = SimpleNamespace(chat_template="t")
    lines = rendering_mismatches({"raw_pr", "raw_hh"}, tok, {"p": {"styles": ["raw_pr", "chat"]}})
    assert lines == ["p was trained on chat-template conversations and plain prompt text; PPO renders its prompts "
                     "as HH-RLHF 'Human:/Assistant:' text and plain prompt text"]


def test_prompts_in_a_subset_of_the_trained_styles_are_no_mismatch() -> None:
    """A model trained on more styles than the prompts use (same template) is fine."""
    tok = SimpleNamespace(chat_template="t")
    record = {"styles": ["chat", "raw_pr"], "chat_template_sha256": _sha("t")}
    assert rendering_mismatches({"chat"}, tok, {"p": record}) == []


def test_a_record_without_a_template_digest_is_not_compared() -> None:
    """chat_template_sha256 None in the record (unknown): no template mismatch."""
    tok = SimpleNamespace(chat_template="t")
    assert rendering_mismatches({"chat"}, tok, {"p": {"styles": ["chat"], "chat_template_sha256": None}}) == []


def test_the_template_is_not_compared_when_the_prompts_do_not_use_chat() -> None:
    """Plain prompts: the record's chat template digest (from its chat rows) is irrelevant."""
    tok = SimpleNamespace(chat_template="t")
    record = {"styles": ["chat", "raw_pr"], "chat_template_sha256": "other"}
    assert rendering_mismatches({"raw_pr"}, tok, {"p": record}) == []


def test_special_token_reading_is_not_compared_when_the_reader_does_not_say() -> None:
    """content_special_tokens None on the reader's side: the record's reading is not compared."""
    tok = SimpleNamespace(chat_template="t")
    record = {"styles": ["chat"], "chat_template_sha256": _sha("t"), "content_special_tokens": "control"}
    assert rendering_mismatches({"chat"}, tok, {"p": record}, "PPO", None) == []


def _model_dir(root: Path, name: str, rendering: dict[str, Any]) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "rlhf_checkpoint.json").write_text(json.dumps({"rendering": rendering}), encoding="utf-8")
    return str(folder)


def test_check_rendering_is_silent_when_the_records_agree(tmp_path: Path) -> None:
    """No mismatch: warn mode warns nothing, error mode raises nothing."""
    tok = SimpleNamespace(chat_template="t")
    models = {"the policy (SFT)": _model_dir(tmp_path, "sft", {"styles": ["chat"], "chat_template_sha256": _sha("t")})}
    warned: list[str] = []
    check_rendering("warn", {"chat"}, tok, models, warned.append)
    check_rendering("error", {"chat"}, tok, models, warned.append)
    assert warned == []


def test_check_rendering_warns_without_the_hh_hint_when_no_model_read_hh(tmp_path: Path) -> None:
    """Plain prompts vs a chat-trained model: one warning line; the HH-column hint only when a model read HH."""
    tok = SimpleNamespace(chat_template="t")
    folder = _model_dir(tmp_path, "sft", {"styles": ["chat"], "chat_template_sha256": _sha("t")})
    warned: list[str] = []
    check_rendering("warn", {"raw_pr"}, tok, {"the policy (SFT)": folder}, warned.append)
    assert warned == [f"warning: the policy (SFT) {folder} was trained on chat-template conversations; PPO renders "
                      "its prompts as plain prompt text (render the prompts as the models were trained: "
                      "data.use_chat_template (plain/HH prompts through the chat template), data.format, "
                      "data.chat_template, or data.content_special_tokens)"]


# ----------------------------------------------------------------------------------------- yamlio
@pytest.mark.parametrize("text, value", [("-1e-5", -1e-05), ("1.5e3", 1500.0), ("1_000e3", 1e6), ("+2E2", 200.0),
                                         ("1e5x", "1e5x"), ("e5", "e5"), ("1e", "1e")])
def test_load_yaml_reads_exponent_floats_and_only_them(text: str, value: Any) -> None:
    """Signed, dotted-with-unsigned-exponent and digit-grouped exponent forms are floats; a longer word is not."""
    assert load_yaml(f"a: {text}") == {"a": value}


def test_dump_yaml_quotes_a_negative_exponent_string() -> None:
    """A string "-1e-5" (the loader's float) is quoted on dump and reads back a string."""
    text = dump_yaml({"s": "-1e-5"})
    assert text == "s: '-1e-5'\n" and load_yaml(text) == {"s": "-1e-5"}


@pytest.mark.parametrize("text", ["._", "._5", "._e-5"])
def test_a_dot_underscore_scalar_reads_as_a_string(text: str) -> None:
    """A dot with no digit right after it is a plain string, as in PyYAML (the float pattern once read `._` as
    a float and float('.') raised a bare ValueError, a traceback instead of a config error), both ways."""
    assert load_yaml(f"a: {text}") == {"a": text} == load_yaml(dump_yaml({"a": text}))
