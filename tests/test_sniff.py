"""The look at each stage's data before its run (stages/sniff.py): another stage's data, or a format/columns
setting that matches no row, stops a stage before it launches and a pipeline before its first stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, invoke_cli, write_yaml
from rlhf_cli.config_loader import load_config
from stages.errors import DataError
from stages.sniff import SNIFF_ROWS, sniff_data

TINY = REPO / "configs" / "tiny"
SFT_ROWS = TINY / "data" / "sft.jsonl"
RM_ROWS = TINY / "data" / "rm.jsonl"
PROMPTS = TINY / "data" / "prompts.jsonl"


def _lines(path: Path, n: int) -> list[str]:
    return path.read_text().splitlines(keepends=True)[:n]


def _rm(*overrides: str):
    return load_config("train-rm", TINY / "rm.yaml", [f"model.name_or_path={REPO}", *overrides],
                       not_yet={"model.name_or_path"})


def test_each_stage_reads_its_own_shipped_data():
    sniff_data("sft", load_config("sft", TINY / "sft.yaml"))
    sniff_data("train-rm", _rm())
    sniff_data("ppo", load_config("ppo", TINY / "ppo.yaml", not_yet={"model.name_or_path",
                                                                      "reward_model.name_or_path"}))


def test_another_stages_data_is_refused_naming_key_file_row_and_reason():
    with pytest.raises(DataError) as exc:
        sniff_data("train-rm", _rm(f"data.train={SFT_ROWS}"))
    assert str(exc.value).startswith(
        f"data.train: none of the first {SNIFF_ROWS} rows of {SFT_ROWS} is a preference pair (row 1: missing key "
        "'chosen' (keys present: messages)): is it another stage's data"), str(exc.value)
    with pytest.raises(DataError, match=rf"^data\.train: none of the first {SNIFF_ROWS} rows of .*rm\.jsonl is an "
                                        r"SFT conversation \(row 1: 'chosen' holds a message list, not HH-RLHF text: "
                                        r"data.columns.messages: chosen reads it as a conversation\)"):
        sniff_data("sft", load_config("sft", TINY / "sft.yaml", [f"data.train={RM_ROWS}", "data.format=auto"]))
    # the eval source too, read in the configured format (messages)
    with pytest.raises(DataError, match=r"^data\.eval: .*rm\.jsonl is an SFT conversation \(row 1: missing key "
                                        r"'messages'"):
        sniff_data("sft", load_config("sft", TINY / "sft.yaml", [f"data.eval={RM_ROWS}"]))


def test_a_file_with_fewer_rows_names_how_many_it_read_and_a_good_row_among_bad_ones_passes(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(_lines(SFT_ROWS, 3)))
    with pytest.raises(DataError, match=r"none of the 3 rows of .*rows\.jsonl is a preference pair"):
        sniff_data("train-rm", _rm(f"data.train={rows}"))
    # judging a few bad rows is data.on_bad_row's job in the run: a pair at row 20 is enough here ...
    rows.write_text("".join(_lines(SFT_ROWS, SNIFF_ROWS - 1) + _lines(RM_ROWS, 1)))
    sniff_data("train-rm", _rm(f"data.train={rows}"))
    # ... but not at row 21: only the first SNIFF_ROWS are read
    rows.write_text("".join(_lines(SFT_ROWS, SNIFF_ROWS) + _lines(RM_ROWS, 1)))
    with pytest.raises(DataError, match=f"none of the first {SNIFF_ROWS} rows"):
        sniff_data("train-rm", _rm(f"data.train={rows}"))


def test_each_file_of_a_list_and_only_local_files_are_read(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=rf"^data\.train: none of the first {SNIFF_ROWS} rows of {SFT_ROWS} "):
        sniff_data("train-rm", _rm(f"data.train=[{RM_ROWS},{SFT_ROWS}]"))
    import stages.data

    def no_hub(*args, **kwargs):
        raise AssertionError("a hub dataset was read")

    monkeypatch.setattr(stages.data, "_read_with_datasets", no_hub)
    sniff_data("train-rm", _rm("data.train=Anthropic/hh-rlhf"))


def test_a_parquet_file_is_read_from_its_head_without_datasets(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import stages.data

    def no_datasets(*args, **kwargs):
        raise AssertionError("datasets converted the whole file")

    monkeypatch.setattr(stages.data, "_read_with_datasets", no_datasets)
    for name, rows in (("sft", SFT_ROWS), ("rm", RM_ROWS)):
        records = [json.loads(line) for line in _lines(rows, 50)]
        pq.write_table(pa.Table.from_pylist(records), tmp_path / f"{name}.parquet")
    sniff_data("train-rm", _rm(f"data.train={tmp_path / 'rm.parquet'}"))
    with pytest.raises(DataError, match=rf"none of the first {SNIFF_ROWS} rows of .*sft\.parquet is a preference "
                                        r"pair \(row 1: missing key 'chosen'"):
        sniff_data("train-rm", _rm(f"data.train={tmp_path / 'sft.parquet'}"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"^data\.train: .*bad\.parquet: cannot read it as parquet"):
        sniff_data("train-rm", _rm(f"data.train={tmp_path / 'bad.parquet'}"))


def test_a_large_json_array_is_read_from_its_head_only(tmp_path, monkeypatch):
    """A .json file holding one array was parsed whole by the look (json.loads of a multi-GB file before a
    launch); one larger than JSON_WINDOW is now read from its first window, item by item. A file whose first
    item does not end inside the window (or is invalid) is left to the run's reading."""
    import stages.data
    import stages.sniff

    monkeypatch.setattr(stages.sniff, "JSON_WINDOW", 4000)
    for name, rows in (("sft", SFT_ROWS), ("rm", RM_ROWS)):
        records = [json.loads(line) for line in _lines(rows, 200)]
        (tmp_path / f"{name}.json").write_text(" \n" + json.dumps(records, indent=1))
        assert (tmp_path / f"{name}.json").stat().st_size > 4000
    whole = stages.data._read_json

    def not_whole(*args, **kwargs):
        raise AssertionError("the look parsed the whole file")

    monkeypatch.setattr(stages.data, "_read_json", not_whole)
    sniff_data("train-rm", _rm(f"data.train={tmp_path / 'rm.json'}"))
    with pytest.raises(DataError, match=r"none of the first \d+ rows of .*sft\.json is a preference pair \(row 1: "
                                        r"missing key 'chosen'"):
        sniff_data("train-rm", _rm(f"data.train={tmp_path / 'sft.json'}"))
    assert stages.sniff._json_array_head(tmp_path / "rm.json", 3)[2].row == 3
    monkeypatch.setattr(stages.data, "_read_json", whole)
    (tmp_path / "one.json").write_text(json.dumps([{"text": "x" * 5000}]))  # no item ends in the window
    assert stages.sniff._json_array_head(tmp_path / "one.json", 3) is None


def test_unreadable_rows_and_identical_pairs(tmp_path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n[1, 2]\n")
    with pytest.raises(DataError, match=r"garbage\.jsonl: no readable row \(skipped: 1 x invalid JSON, 1 x expected a "
                                        r"JSON object, got list\)$"):
        sniff_data("sft", load_config("sft", TINY / "sft.yaml", [f"data.train={garbage}"]))
    csv = tmp_path / "big.jsonl"  # another kind of file: read no further than the records looked at
    csv.write_text("prompt,chosen,rejected\n" + "p,a,b\n" * 100_000 + "{not read\n")
    with pytest.raises(DataError, match=r"big\.jsonl: no readable row among its first 20 lines \(skipped: 20 x invalid "
                                        r"JSON\)$"):
        sniff_data("sft", load_config("sft", TINY / "sft.yaml", [f"data.train={csv}"]))
    for empty, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):  # a data-prep step that failed
        (tmp_path / empty).write_text(text)
        with pytest.raises(DataError, match=f"data.eval: {tmp_path / empty}: no record in it \\(an empty file, blank "
                                            "lines only, or no rows\\)$"):
            sniff_data("train-rm", _rm(f"data.eval={tmp_path / empty}"))
    same = tmp_path / "same.jsonl"  # identical chosen and rejected: a pair in the right format (the run drops it)
    same.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    sniff_data("train-rm", _rm(f"data.train={same}", "data.eval_fraction=0", "data.format=auto"))


def test_ptx_data_is_read_only_when_its_loss_is_on(tmp_path):
    cfg = [f"data.ptx={RM_ROWS}"]
    not_yet = {"model.name_or_path", "reward_model.name_or_path"}
    sniff_data("ppo", load_config("ppo", TINY / "ppo.yaml", cfg, not_yet=not_yet))  # ppo.ptx_coef 0: unread
    with pytest.raises(DataError, match=r"^data\.ptx: .* is an SFT conversation \(PTX\) \(row 1: 'chosen' holds "
                                        r"a message list, not HH-RLHF text: data\.ptx_columns\.messages: chosen reads "
                                        r"it as a conversation\): is it another stage's data\? If not, set "
                                        r"data\.ptx_format / data\.ptx_columns to read it$"):
        sniff_data("ppo", load_config("ppo", TINY / "ppo.yaml", [*cfg, "ppo.ptx_coef=0.5"], not_yet=not_yet))


def test_stage_commands_look_before_launching_and_the_pipeline_before_its_first_stage(tmp_path, hh_sample):
    res = invoke_cli("train-rm", "--config", str(TINY / "sft.yaml"), "--dry-run", "--set",
                     f"output_dir={tmp_path / 'rm'}")
    assert res.exit_code == 1 and "error: data.train: none of the first 20 rows of " in res.stderr, res.output
    assert "dry run: nothing trained" not in res.stdout
    res = invoke_cli("sft", "--config", str(TINY / "sft.yaml"), "--set", f"output_dir={tmp_path / 'sft'}",
                     "--set", f"data.train={hh_sample}", "--num-gpus", "2", "--set", "data.format=messages")
    assert res.exit_code == 1 and "is an SFT conversation (row 1: missing key 'messages'" in res.stderr, res.output
    assert not (tmp_path / "sft").exists()  # before the launch (and before the output folder is made)
    cfg = yaml.safe_load((TINY / "pipeline.yaml").read_text())
    cfg.update(output_dir=str(tmp_path / "runs"), sft={"config": str(TINY / "sft.yaml")},
               rm={"config": str(TINY / "rm.yaml"), "set": [f"data.train={PROMPTS}"]},
               ppo={"config": str(TINY / "ppo.yaml")})
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "p.yaml", cfg)))  # a real run, not a dry one
    assert res.exit_code == 1 and "pipeline stage rm: data.train: none of the first 20 rows of " in res.stderr, \
        res.output
    assert not (tmp_path / "runs").exists()  # SFT never started


# ----------------------------------------------------------------------------------------- mutation-audit additions
def _big_json(path: Path, records: list) -> Path:
    """`records` as one indented JSON array (larger than the 4000-character window the tests set)."""
    path.write_text(json.dumps(records, indent=1))
    assert path.stat().st_size > 4000
    return path


def _no_whole_read(monkeypatch) -> None:
    import stages.data
    import stages.sniff

    def not_whole(*args, **kwargs):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(stages.sniff, "JSON_WINDOW", 4000)
    monkeypatch.setattr(stages.data, "_read_json", not_whole)
    monkeypatch.setattr(stages.data, "_read_with_datasets", not_whole)


def test_upper_case_suffixes_take_the_head_only_paths(tmp_path: Path, monkeypatch) -> None:
    """`.JSON` and `.PARQUET` are read from their heads like `.json`/`.parquet` (the suffix check ignores case),
    never through the whole-file readers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in _lines(RM_ROWS, 200)]
    big = _big_json(tmp_path / "RM.JSON", records)
    pq.write_table(pa.Table.from_pylist(records[:50]), tmp_path / "RM.PARQUET")
    _no_whole_read(monkeypatch)
    sniff_data("train-rm", _rm(f"data.train={big}"))
    sniff_data("train-rm", _rm(f"data.train={tmp_path / 'RM.PARQUET'}"))


def test_a_json_array_head_skips_non_object_items_keeping_their_numbers(tmp_path: Path, monkeypatch) -> None:
    """Items that are not objects are left out of the head, and the others keep their position in the array as
    row number: [[1, 2], sft row, sft row, ...] looked at as pairs reads 19 objects of the first 20 items and
    names item 2 as the first reason."""
    import stages.sniff

    records = [[1, 2]] + [json.loads(line) for line in _lines(SFT_ROWS, 200)]
    big = _big_json(tmp_path / "mixed.json", records)
    _no_whole_read(monkeypatch)
    head = stages.sniff._json_array_head(big, 3)
    assert [r.row for r in head] == [2, 3] and all(isinstance(r.data, dict) for r in head)
    with pytest.raises(DataError, match=r"none of the 19 rows of .*mixed\.json is a preference pair \(row 2: "
                                        r"missing key 'chosen'"):
        sniff_data("train-rm", _rm(f"data.train={big}"))


def test_a_large_json_array_with_a_byte_order_mark_is_read_from_its_head(tmp_path: Path, monkeypatch) -> None:
    """A UTF-8 BOM before the `[` (files saved by some Windows tools) does not hide the array from the look."""
    import stages.sniff

    records = [json.loads(line) for line in _lines(RM_ROWS, 200)]
    big = tmp_path / "bom.json"
    big.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).encode())
    _no_whole_read(monkeypatch)
    assert [r.row for r in stages.sniff._json_array_head(big, 2)] == [1, 2]
    sniff_data("train-rm", _rm(f"data.train={big}"))
