"""Bad input, generated (hypothesis): configs, data files and checkpoints. Whatever the input, the outcome is
either a valid result or one error of the tool's own type whose message names the file and the row or key
(never another exception, so the CLI never shows a traceback); through the real CLI, the exit code is not 0
and nothing in the output directory looks complete."""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import TINY_SFT, run_cli, tiny_sft_dict, write_yaml
from rlhf_cli.config_loader import load_config
from stages.config import DataSource, PPODataConfig, RMDataConfig, SFTDataConfig
from stages.data import BadRowLog, load_conversations
from stages.errors import CheckpointError, ConfigError, DataError
from stages.models import train_tokenizer
from stages.pairs import load_pairs
from stages.ppo.prompts import load_prompts

#: fixed examples in CI (a red build must be reproducible), fresh ones elsewhere; no example database in the tree
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=os.environ.get("CI") == "true",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: real keys of the SFT schema (and near misses), so generated overrides hit validation, not only "unknown key"
SFT_KEYS = [
    "seed", "output_dir", "model.name_or_path", "model.from_config.hidden_size", "model.dtype", "data.train",
    "data.max_length", "data.max_prompt_length", "data.eval_fraction", "data.format", "data.on_bad_row",
    "train.lr", "train.micro_batch_size", "train.max_steps", "train.epochs", "train.warmup_steps",
    "train.adam_betas", "train.on_nonfinite", "train.save_total_limit", "deepspeed.zero_stage",
    "deepspeed.offload_param", "deepspeed.precision", "logging.log_every", "train.lr_rate", "trian.lr", "data.mx",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=12), st.lists(st.integers(-3, 3), max_size=3),
)


def _yaml_value(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SFT_KEYS), scalars), min_size=1, max_size=3))
def test_config_overrides_either_validate_or_name_the_key(overrides):
    items = [f"{key}={_yaml_value(value)}" for key, value in overrides]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_yaml(Path(tmp) / "sft.yaml", tiny_sft_dict(Path(tmp)))
        try:
            cfg = load_config("sft", path, items)
        except ConfigError as exc:
            message = str(exc)
            assert str(path) in message or "--set" in message, message
            assert any(key.split(".")[-1] in message or key.split(".")[0] in message for key, _ in overrides), message
            return
    # accepted: every overridden key is part of the validated config (no key silently dropped)
    dumped = cfg.model_dump()
    for key, _ in overrides:
        node = dumped
        for part in key.split("."):
            assert part in node, (key, items)
            node = node[part]


@FUZZ
@given(st.text(max_size=200))
def test_config_file_contents_either_validate_or_name_the_file(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as exc:  # no random text is a complete SFT config
            load_config("sft", path, [])
        assert str(path) in str(exc.value)


# --------------------------------------------------------------------------------------------- data
good_sft = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20).filter(str.strip),
                                  "response": st.text(min_size=1, max_size=20).filter(str.strip)})
junk_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                   st.text(max_size=10)),
                         lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                 st.dictionaries(st.sampled_from(["prompt", "response", "chosen",
                                                                                  "rejected", "messages", "x"]),
                                                                 inner, max_size=4)), max_leaves=8)
lines = st.one_of(
    good_sft.map(json.dumps),
    junk_json.map(json.dumps),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" ")),
    st.just(json.dumps({"prompt": "p", "response": "r" * 20000})),  # a huge row is truncated, not an error
)


def _write_lines(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else r.encode("utf-8")) + b"\n" for r in rows))
    return path


def _row_named(message: str, path: Path) -> bool:
    return f"{path} row " in message or f"{path}:" in message or f"no usable rows in {path}" in message


@FUZZ
@given(st.lists(lines, min_size=1, max_size=8))
def test_sft_data_rows_load_or_name_the_file_and_row(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_lines(Path(tmp) / "d.jsonl", rows)
        for mode in ("error", "skip"):
            cfg = SFTDataConfig(train=DataSource(path=str(path)), on_bad_row=mode)
            log = BadRowLog()
            try:
                convs = load_conversations(cfg.train, cfg, log)
            except DataError as exc:
                assert _row_named(str(exc), path), str(exc)
                continue
            assert len(convs) + log.total <= len(rows)
            if mode == "error":
                assert log.total == 0


pair = st.fixed_dictionaries({"prompt": st.sampled_from(["q1", "q2"]), "chosen": st.sampled_from(["a", "b", "c"]),
                              "rejected": st.sampled_from(["a", "b", "c"])})


@FUZZ
@given(st.lists(st.one_of(pair.map(json.dumps), junk_json.map(json.dumps)), min_size=1, max_size=10),
       st.sampled_from(["drop", "error", "keep"]))
def test_preference_rows_duplicates_and_identical_pairs_are_named_or_counted(rows, duplicates):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_lines(Path(tmp) / "p.jsonl", rows)
        data = RMDataConfig(train=DataSource(path=str(path)), on_bad_row="skip", duplicates=duplicates)
        try:
            loaded = load_pairs(data.train, data, BadRowLog())
        except DataError as exc:
            assert _row_named(str(exc), path) or "no usable preference pairs" in str(exc), str(exc)
            if "duplicate of" in str(exc):
                assert duplicates == "error" and str(exc).count(" row ") == 2  # both rows named
            return
        keys = [json.dumps([p.prompt, p.chosen, p.rejected], default=str) for p, _ in loaded.pairs]
        if duplicates != "keep":
            assert len(keys) == len(set(keys))
        assert all(p.chosen != p.rejected for p, _ in loaded.pairs)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the quick brown fox", "jumps over the lazy dog"] * 20, vocab_size=300, min_frequency=1)


@FUZZ
@given(rows=st.lists(st.one_of(st.fixed_dictionaries({"prompt": st.text(max_size=20)}).map(json.dumps),
                               junk_json.map(json.dumps), st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))),
                     min_size=1, max_size=6))
def test_prompt_rows_load_or_name_the_file_and_row(tokenizer, rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_lines(Path(tmp) / "prompts.jsonl", rows)
        data = PPODataConfig(train=DataSource(path=str(path)))
        try:
            prompts, _, _ = load_prompts(data.train, data, tokenizer, BadRowLog())
        except DataError as exc:
            assert _row_named(str(exc), path) or "no usable" in str(exc), str(exc)
            return
        assert prompts and all(len(p) > 0 for p in prompts)  # a prompt that encodes to no token is refused


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("ckpt") / "model"
    cfg = yaml.safe_load(TINY_SFT.read_text())["model"]["from_config"]
    config = AutoConfig.for_model(cfg.pop("model_type"), **{**cfg, "vocab_size": len(tokenizer)})
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@FUZZ
@given(st.data())
def test_truncated_or_missing_checkpoint_files_are_a_checkpoint_error_naming_it(saved_model, tokenizer, data):
    from stages.config import ModelConfig
    from stages.models import build_causal_lm

    name = data.draw(st.sampled_from(["model.safetensors", "config.json", "tokenizer.json"]))
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "broken"
        shutil.copytree(saved_model, broken)
        target = broken / name
        size = target.stat().st_size
        keep = data.draw(st.one_of(st.just(-1), st.integers(0, size - 1)))  # -1: the file is missing
        if keep < 0:
            target.unlink()
        else:
            with open(target, "r+b") as f:
                f.truncate(keep)
            if name.endswith(".json"):  # cut only the trailing newline: still the same, valid file
                try:
                    json.loads(target.read_text(encoding="utf-8"))
                    assume(False)
                except (ValueError, UnicodeDecodeError):
                    pass
        cfg = ModelConfig(name_or_path=str(broken))
        if name == "tokenizer.json":
            from stages.distributed import DistInfo
            from stages.models import prepare_tokenizer

            import torch

            with pytest.raises(CheckpointError) as exc:
                prepare_tokenizer(cfg, Path(tmp), DistInfo(0, 0, 1, torch.device("cpu")), lambda: iter(()), None)
            assert str(broken) in str(exc.value)
            return
        with pytest.raises(CheckpointError) as exc:
            build_causal_lm(cfg, tokenizer, "fp32", {}, 0)
        assert str(broken) in str(exc.value)


# --------------------------------------------------------------------------------------------- the CLI
def _sft_case(tmp: Path, cfg: dict, name: str) -> tuple[list[str], str]:
    """(CLI args, text the one error line must contain) for one kind of bad input (`cfg` adjusted in place)."""
    data = tmp / "data.jsonl"
    if name == "unknown key":
        return ["--set", "train.learning_rate=1e-4"], "train.learning_rate"
    if name == "wrong type":
        return ["--set", "train.micro_batch_size=many"], "train.micro_batch_size"
    if name == "negative length":
        return ["--set", "data.max_length=-8"], "data.max_length"
    if name == "missing data file":
        return ["--set", f"data.train={tmp / 'nowhere.jsonl'}"], "nowhere.jsonl"
    if name == "impossible batch":
        return ["--set", "train.micro_batch_size=100000"], "fewer than one global batch"
    if name == "invalid JSON row":
        good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        _write_lines(data, [json.dumps(good), '{"messages": [{"role": "us'])
        return ["--set", f"data.train={data}"], f"{data} row 2: invalid JSON"
    if name == "truncated checkpoint":
        model = tmp / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        (model / "model.safetensors").write_bytes(b"\x00" * 10)
        del cfg["model"]["from_config"]
        cfg["model"]["name_or_path"] = str(model)
        train_tokenizer(["a tiny corpus"] * 5, vocab_size=280, min_frequency=1).save_pretrained(model)
        return [], f"cannot load model from {model}: SafetensorError"
    raise AssertionError(name)


CASES = ["unknown key", "wrong type", "negative length", "missing data file", "impossible batch", "invalid JSON row",
         "truncated checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_through_the_cli_is_one_error_line_and_nothing_looks_complete(tmp_path, case):
    cfg = tiny_sft_dict(tmp_path, max_steps=2)
    args, expected = _sft_case(tmp_path, cfg, case)
    path = write_yaml(tmp_path / "sft.yaml", cfg)
    res = run_cli("sft", "--config", str(path), *args)
    assert res.returncode in (1, 2), res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and expected in res.stderr, res.stderr
    out = tmp_path / "out"
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    if case == "unknown key":
        res = run_cli("sft", "--config", str(path), *args, "--debug")
        assert "Traceback" in res.stderr  # --debug shows where it came from
