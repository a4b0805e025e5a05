"""`rlhf train-rm` end to end through the real CLI: the tiny reward model after the tiny SFT learns the toy
preferences, its checkpoint scores identically in plain transformers, exact resume, the real HH-RLHF sample, two
DeepSpeed processes with ZeRO-2 / ZeRO-3."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_cli, tiny_sft_dict, write_yaml
from stages.metrics import read_metrics
from stages.toydata import SHIPPED

TINY_RM = REPO / "configs" / "tiny" / "rm.yaml"
RM_DATA = REPO / "configs" / "tiny" / "data" / "rm.jsonl"
#: the shipped toy pairs, and the 10 % the tiny RM config holds out (eval_fraction 0.1)
TOY_PAIRS = SHIPPED["rm.jsonl"][1]
EVAL_PAIRS = TOY_PAIRS // 10
#: the tiny SFT model's architecture, for RM runs from a random init
TINY_ARCH = yaml.safe_load((REPO / "configs" / "tiny" / "sft.yaml").read_text())["model"]["from_config"]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    """The shipped tiny SFT run (what configs/tiny/rm.yaml starts from), trained once for this module."""
    tmp = tmp_path_factory.mktemp("sft")
    cfg = tiny_sft_dict(tmp, max_steps=None)
    cfg["train"].update({"eval_every": 0, "save_every": 0})
    res = run_cli("sft", "--config", str(write_yaml(tmp / "sft.yaml", cfg)))
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(cfg["output_dir"])


def rm_dict(tmp_path: Path, sft: Path | None, data: Path = RM_DATA, **train) -> dict:
    """The shipped tiny RM config, made absolute and pointed at tmp_path (and at `sft` and `data`)."""
    cfg = yaml.safe_load(TINY_RM.read_text())
    cfg["output_dir"] = str(tmp_path / "rm")
    cfg["data"]["train"] = str(data)
    if sft is not None:
        cfg["model"]["name_or_path"] = str(sft)
    cfg["train"].update(train)
    cfg["logging"] = {"log_every": 1, "tensorboard": False}
    return cfg


#: the first FEW_PAIRS shipped pairs, for the runs of a few steps (loading and evaluating all 10,000 costs time)
FEW_PAIRS = 1000


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "rm_few.jsonl"
    path.write_text("".join(RM_DATA.read_text().splitlines(keepends=True)[:FEW_PAIRS]))
    return path


def _train(tmp_path: Path, cfg: dict, *extra: str, name: str = "rm.yaml", expect: int = 0, env: dict | None = None):
    res = run_cli("train-rm", "--config", str(write_yaml(tmp_path / name, cfg)), *extra, env=env)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return Path(cfg["output_dir"]), res


def _rows(out: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if key in r]


def test_tiny_rm_after_tiny_sft_learns_the_preferences_and_saves_a_transformers_reward_model(tmp_path, tiny_sft):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.config import ModelConfig, RMDataConfig
    from stages.data import BadRowLog, DataReport
    from stages.pairs import load_pairs, tokenize_pairs
    from stages.reward import collate_pairs
    from stages.reward_model import build_reward_model

    # the shipped settings, paths changed and cut to 200 of its 1,124 steps (the suite's time)
    cfg = rm_dict(tmp_path, tiny_sft, max_steps=200, eval_every=100)
    cfg["logging"]["profile_step"] = 200  # the last step: its training work, not its evaluation or checkpoint
    out, res = _train(tmp_path, cfg)
    evals = _rows(out, "eval/accuracy")
    assert evals[-1]["step"] == _rows(out, "train/loss")[-1]["step"] == 200
    # held-out split of the toy preferences (gold-labelled near-misses: the whole shipped run reaches 0.88, these 200
    # steps 0.79 on 2026-12-06, level from step 120 on; chance 0.5)
    assert evals[-1]["eval/accuracy"] >= 0.75, evals[-1]
    assert evals[-1]["eval/margin"] > evals[0]["eval/margin"] > 0
    train = _rows(out, "train/loss")
    # one logged loss per step of a small batch: single values scatter by +-0.2, so means over many steps are
    # compared: the last 100 steps' mean below the first 20 steps' and below chance (ln 2, an uninformative RM)
    first, last = (statistics.fmean(r["train/loss"] for r in rows) for rows in (train[:20], train[-100:]))
    assert len(train) == 200 and last < first - 0.1 and last < math.log(2) - 0.15, (first, last)
    assert all(0 <= r["train/accuracy"] <= 1 and r["train/tokens_per_s"] > 0 for r in train)
    assert "eval accuracy" in res.stdout and "train-rm" in res.stdout
    assert sorted(p.name for p in out.glob("profile-*")) == ["profile-step-200.json.gz", "profile-step-200.txt"]
    table = (out / "profile-step-200.txt").read_text()
    assert "autograd::engine::evaluate_function" in table
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["examples"] == EVAL_PAIRS and report["train"]["examples"] == TOY_PAIRS - EVAL_PAIRS

    final = out / "final"
    model, info = AutoModelForSequenceClassification.from_pretrained(final, output_loading_info=True)
    assert not any(info.values()), info
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.score.bias is None
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["split"] == "eval" and stats["step"] == evals[-1]["step"] and stats["pairs"] == EVAL_PAIRS
    assert stats["mean"] == pytest.approx(evals[-1]["eval/reward_mean"])
    assert stats["std"] == pytest.approx(evals[-1]["eval/reward_std"])

    # plain transformers, one text at a time, scores exactly like the training code on a padded batch
    data = RMDataConfig(train=str(RM_DATA), max_length=96)
    pairs = load_pairs(data.train, data, BadRowLog()).pairs[:6]
    rows = tokenize_pairs(pairs, tok, data, DataReport())
    ours = build_reward_model(ModelConfig(name_or_path=str(final)), tok, "fp32", {}, 0, False, False).eval()
    with torch.no_grad():
        batch = collate_pairs(rows, list(range(len(rows))), tok.pad_token_id, torch.device("cpu"))
        trained_code = ours(batch["input_ids"], batch["attention_mask"])[0]
        texts = []
        for pair, _ in pairs:
            for side in ("chosen", "rejected"):
                msgs = [{"role": r, "content": c} for r, c in pair.conversation(side).messages]
                texts.append(tok.apply_chat_template(msgs, tokenize=False))
        hf = []
        for text in texts:
            hf.append(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
        batched = {}
        for side in ("right", "left"):
            tok.padding_side = side
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            assert (enc["input_ids"] == tok.pad_token_id).any()  # really padded
            batched[side] = model(**enc).logits[:, 0].tolist()
    order = [2 * i for i in range(6)] + [2 * i + 1 for i in range(6)]  # [chosen..., rejected...]
    assert trained_code.tolist() == pytest.approx([hf[i] for i in order], abs=1e-5)
    assert batched["right"] == pytest.approx(hf, abs=1e-5) and batched["left"] == pytest.approx(hf, abs=1e-5)


def test_kill9_at_a_random_step_then_resume_continues_exactly_with_lm_and_centring_terms(tmp_path, few_pairs):
    """From a random-init model (tokenizer trained on the pairs), attention dropout on, LM loss on the chosen
    response and the centring term: the process SIGKILLed after a random step (RLHF_FAULT=kill@k) and resumed
    from its newest complete checkpoint reproduces the uninterrupted curve and weights exactly."""
    def cfg_for(root: Path) -> dict:
        cfg = rm_dict(root, None, few_pairs, max_steps=8, save_every=2, save_total_limit=10, eval_every=4, micro_batch_size=8)
        cfg["model"] = {"from_config": {**TINY_ARCH, "attention_dropout": 0.2}}
        cfg["loss"] = {"lm_coef": 0.5, "center_coef": 0.01}
        return cfg

    (tmp_path / "full").mkdir()
    full, _ = _train(tmp_path / "full", cfg_for(tmp_path / "full"))
    rows = _rows(full, "train/loss")
    for r in rows:  # the logged loss is the sum of its terms
        total = r["train/pair_loss"] + 0.5 * r["train/lm_loss"] + 0.01 * r["train/center_loss"]
        assert r["train/loss"] == pytest.approx(total, rel=1e-9)
    assert rows[-1]["train/lm_loss"] < rows[0]["train/lm_loss"]
    step = random.Random(os.environ.get("RLHF_TEST_SEED")).randrange(3, 8)
    (tmp_path / "cut").mkdir()
    cut, _ = _train(tmp_path / "cut", cfg_for(tmp_path / "cut"), env={"RLHF_FAULT": f"kill@{step}"}, expect=-9)
    assert not (cut / "final").exists()
    _, res = _train(tmp_path / "cut", cfg_for(tmp_path / "cut"), "--resume")
    assert f"resumed from step {2 * ((step - 1) // 2)}" in res.stdout, f"kill@{step}"  # the newest before step

    def curve(out: Path) -> list[dict]:  # every metric row, timing aside
        return [{k: v for k, v in r.items() if k not in ("time", "train/tokens_per_s")}
                for r in read_metrics(out / "metrics.jsonl") if "event" not in r]

    assert curve(cut) == curve(full), f"kill@{step}"
    from safetensors.torch import load_file

    a, b = load_file(cut / "final" / "model.safetensors"), load_file(full / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("lm_head") for k in a)  # the LM head is not part of the reward model
    assert (cut / "final" / "reward_stats.json").read_text() == (full / "final" / "reward_stats.json").read_text()


def test_a_stop_signal_checkpoint_after_a_resume_keeps_the_last_evaluations_reward_stats(tmp_path, few_pairs):
    """Evaluation at step 4 (a scheduled save), SIGTERM after step 5 (a checkpoint, no evaluation), resumed and
    SIGTERM after step 6: both stop checkpoints carry step 4's reward statistics (the resumed run reads them
    from the checkpoint it continues; it used to save none)."""
    cfg = rm_dict(tmp_path, None, few_pairs, max_steps=8, save_every=4, save_total_limit=10, eval_every=0,
                  micro_batch_size=8)
    cfg["model"] = {"from_config": TINY_ARCH}
    out, _ = _train(tmp_path, cfg, env={"RLHF_FAULT": "sigterm@5"}, expect=143)
    _train(tmp_path, cfg, "--resume", env={"RLHF_FAULT": "sigterm@6"}, expect=143)
    stats = [json.loads((out / f"checkpoint-{s:08d}" / "hf" / "reward_stats.json").read_text()) for s in (4, 5, 6)]
    assert stats[0]["step"] == 4 and stats[0]["split"] == "eval" and stats[1] == stats[0] == stats[2]


def test_real_hh_rlhf_sample_trains_and_its_bad_row_is_named(tmp_path, hh_sample):
    cfg = rm_dict(tmp_path, None, max_steps=2, micro_batch_size=4, save_every=0, eval_every=0)
    cfg["model"] = {"from_config": TINY_ARCH}
    cfg["data"].update({"train": str(hh_sample), "format": "auto", "max_length": 128, "eval_fraction": 0.05})
    out, res = _train(tmp_path, cfg, expect=1)
    assert f"{hh_sample} row " in res.stderr and "empty chosen response" in res.stderr
    assert "Traceback" not in res.stderr and not (out / "final").exists()
    cfg["data"]["on_bad_row"] = "skip"
    out, res = _train(tmp_path, cfg, "--overwrite")
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["skipped_by_reason"] == {"empty chosen response": 1}
    assert report["train"]["examples"] + report["eval"]["examples"] == 399
    assert report["train"]["prompt_truncated"] > 0  # real dialogues are longer than 128 tokens
    said = " ".join((res.stdout + res.stderr).split())  # ... most of them: the run's warning counts pairs
    assert f"train data: most of the {report['train']['examples']} pairs were cut to data.max_length" in said, said
    assert json.loads((out / "final" / "reward_stats.json").read_text())["split"] == "eval"


def test_eval_pairs_that_truncation_makes_identical_are_a_warning_and_the_stats_come_from_the_train_set(
        tmp_path, few_pairs):  # (60 train pairs: the train-set statistics score them all)
    """data.eval whose pairs differ only past max_length (32 tokens; each response is 40 words and differs in the
    last): every one is dropped as identical after truncation, so the run says there is no usable eval pair,
    trains without evaluating, and final/reward_stats.json is the train set's."""
    words = " ".join(["one two three four"] * 10)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"count {i}"}],
                                        "chosen": [{"role": "assistant", "content": f"{words} yes"}],
                                        "rejected": [{"role": "assistant", "content": f"{words} no"}]}) + "\n"
                            for i in range(2)))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(few_pairs.read_text().splitlines(keepends=True)[:60]))
    cfg = rm_dict(tmp_path, None, train, max_steps=1, micro_batch_size=4, save_every=0, eval_every=1)
    cfg["model"] = {"from_config": TINY_ARCH}
    cfg["data"].update({"eval": str(held), "max_length": 32})
    out, res = _train(tmp_path, cfg)
    assert "no usable eval pair; reward statistics will come from the train set" in res.stdout + res.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["identical_after_truncation"] == 2 and report["eval"]["examples"] == 0
    assert not _rows(out, "eval/loss")
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["split"] == "train" and stats["pairs"] == report["train"]["examples"] > 50


@pytest.mark.slow
def test_two_processes_zero2_match_one_process_with_accumulation(tmp_path, tiny_sft, few_pairs):
    """2 ranks x micro 8 equals 1 rank x micro 8 x accumulation 2: the pair loss is the mean over the global batch."""
    stage = ("--set", "deepspeed.zero_stage=2")
    runs, outputs = {}, {}
    for name, extra, train in (("two", ("--num-gpus", "2"), {}), ("one", (), {"gradient_accumulation_steps": 2})):
        (tmp_path / name).mkdir()
        cfg = rm_dict(tmp_path / name, tiny_sft, few_pairs, max_steps=4, micro_batch_size=8, eval_every=0,
                      save_every=0, **train)
        runs[name], outputs[name] = _train(tmp_path / name, cfg, *extra, *stage)
    assert "deepspeed.launcher.runner --num_gpus 2" in outputs["two"].stdout
    r2, r1 = _rows(runs["two"], "train/loss"), _rows(runs["one"], "train/loss")
    assert len(r2) == 4
    for key in ("train/loss", "train/accuracy", "train/margin", "train/grad_norm"):
        assert [r[key] for r in r2] == pytest.approx([r[key] for r in r1], rel=1e-4, abs=1e-6), key
    s2 = json.loads((runs["two"] / "final" / "reward_stats.json").read_text())
    s1 = json.loads((runs["one"] / "final" / "reward_stats.json").read_text())
    assert s2["pairs"] == s1["pairs"] == FEW_PAIRS // 10 and s2["mean"] == pytest.approx(s1["mean"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_two_processes_zero3_with_lm_loss_match_one_process(tmp_path, tiny_sft, few_pairs):
    """ZeRO-3 partitions the weights, the tied LM head included: two ranks still equal one rank with
    accumulation 2, and the saved model has full (gathered) weights."""
    from transformers import AutoModelForSequenceClassification

    stage = ("--set", "deepspeed.zero_stage=3")
    runs = {}
    for name, extra, train in (("two", ("--num-gpus", "2"), {}), ("one", (), {"gradient_accumulation_steps": 2})):
        (tmp_path / name).mkdir()
        cfg = rm_dict(tmp_path / name, tiny_sft, few_pairs, max_steps=4, micro_batch_size=8, eval_every=2,
                      save_every=2, **train)
        cfg["loss"] = {"lm_coef": 1.0, "center_coef": 0.0}
        runs[name], _ = _train(tmp_path / name, cfg, *extra, *stage)
    r2, r1 = _rows(runs["two"], "train/loss"), _rows(runs["one"], "train/loss")
    assert len(r2) == 4
    for key in ("train/loss", "train/lm_loss", "train/pair_loss"):
        assert [r[key] for r in r2] == pytest.approx([r[key] for r in r1], rel=1e-4), key
    model, info = AutoModelForSequenceClassification.from_pretrained(runs["two"] / "final", output_loading_info=True)
    assert not any(info.values()), info
    assert model.score.weight.shape == (1, 128)  # gathered, not a ZeRO-3 shard
    stats = json.loads((runs["two"] / "final" / "reward_stats.json").read_text())
    assert stats["pairs"] == FEW_PAIRS // 10 and stats["step"] == 4


@pytest.mark.slow
def test_two_processes_zero3_with_an_untied_lm_head(tmp_path, few_pairs):
    """An LM head of its own (untied model), created after the partitioned model, is partitioned and trained by
    DeepSpeed too, and is not saved with the reward model."""
    from safetensors.torch import load_file

    cfg = rm_dict(tmp_path, None, few_pairs, max_steps=3, micro_batch_size=8, eval_every=0, save_every=0)
    cfg["model"] = {"from_config": {**TINY_ARCH, "tie_word_embeddings": False}}
    cfg["loss"] = {"lm_coef": 1.0, "center_coef": 0.0}
    out, _ = _train(tmp_path, cfg, "--num-gpus", "2", "--set", "deepspeed.zero_stage=3")
    rows = _rows(out, "train/loss")
    assert len(rows) == 3 and rows[-1]["train/lm_loss"] < rows[0]["train/lm_loss"]
    weights = load_file(out / "final" / "model.safetensors")
    assert "score.weight" in weights and not any("lm_head" in k for k in weights)


def test_the_rm_data_check_calls_the_cut_examples_pairs(monkeypatch, tmp_path):
    """The RM's "most of the N … were cut" warning counts pairs (its report's examples are pairs), not examples."""
    import stages.reward as reward
    import stages.trainer as trainer
    from rlhf_cli.config_loader import load_config
    from stages.data import DataReport

    cut = {"train": DataReport(examples=4, prompt_truncated=3)}
    monkeypatch.setattr(reward, "load_rm_data", lambda *a, **k: (None, False, list(range(64)), None, cut))
    monkeypatch.setattr(reward, "data_rendering", lambda *a: None)
    said: list[str] = []
    monkeypatch.setattr(trainer, "say", lambda enabled, text: said.append(text))
    cfg = load_config("train-rm", TINY_RM, [f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={tmp_path / 'sft'}"],
                      not_yet={"model.name_or_path"})
    reward.check_data(cfg, 1)
    assert any("warning: train data: most of the 4 pairs were cut to data.max_length" in t for t in said), said
