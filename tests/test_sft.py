"""The SFT stage end to end through the real CLI: loss falls, HF checkpoint loads, exact resume, two DeepSpeed
processes with ZeRO-3 on the CPU accelerator."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_sft_dict, write_yaml
from stages.metrics import read_metrics
from stages.toydata import sft_rows


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


def _run(tmp_path: Path, *extra: str, name: str = "sft.yaml", **train) -> tuple[Path, object]:
    cfg = tiny_sft_dict(tmp_path, **train)
    path = write_yaml(tmp_path / name, cfg)
    res = run_cli("sft", "--config", str(path), *extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return Path(cfg["output_dir"]), res


@pytest.mark.parametrize("world_size", [1, 2])
def test_train_step_gradient_is_that_of_the_global_token_mean(monkeypatch, world_size):
    """sft.train_step over two micro-batches whose prompts carry no loss (IGNORE labels), so trained tokens
    differ from attended ones: the accumulated gradient equals that of sum(NLL over trained tokens) / their
    number. With 2 ranks holding the same batches (the all-reduce doubles the counts; DeepSpeed's average of
    equal gradients is this rank's), the global token mean is the same and so must the gradient be."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import GradOnlyEngine
    from stages import sft
    from stages.distributed import DistInfo
    from stages.lm import collate, shifted_nll_sum

    monkeypatch.setattr(sft, "all_reduce_sum", lambda v, d: world_size * torch.as_tensor(v, dtype=torch.float64))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
            {"input_ids": [13, 14, 15, 16], "labels": [-100, -100, -100, 16]},
            {"input_ids": [17, 18], "labels": [-100, 18]}]
    cpu = torch.device("cpu")
    batches = [collate(rows[:2], 0, cpu), collate(rows[2:], 0, cpu)]
    dist = DistInfo(rank=0, local_rank=0, world_size=world_size, device=cpu)
    out = sft.train_step(GradOnlyEngine(model, len(batches)), batches, dist)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    trained = 3 + 2 + 1 + 1  # label positions after the first: 7 8 9 | 11 12 | 16 | 18
    loss = sum(shifted_nll_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               b["labels"]) for b in batches) / trained
    loss.backward()
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert (out["trained_tokens"], out["tokens"]) == (world_size * trained, world_size * 14)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-7, rtol=1e-5), n


def test_evaluation_covers_every_row_once_across_ranks(monkeypatch):
    """sft.evaluate over 5 rows, micro-batches of 2, as rank 0 and rank 1 of two (each rank's sums captured at
    the all-reduce and added here) and as one process: the token-mean NLL of all 5 rows computed directly,
    every trained token counted once (rank 1's third forward is a stand-in row without trained tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import GradOnlyEngine
    from stages import sft
    from stages.data import TokenRows
    from stages.distributed import DistInfo
    from stages.lm import shifted_nll_sum

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    rows = TokenRows(with_positions=False)
    examples = [([5, 6, 7, 8], [-100, 6, 7, 8]), ([9, 10, 11], [-100, -100, 11]), ([12, 13], [-100, 13]),
                ([14, 15, 16, 17, 18], [-100, -100, 16, 17, 18]), ([19, 20, 21], [-100, 20, 21])]
    for ids, labels in examples:
        rows.append(ids, labels)
    with torch.no_grad():
        nll = sum(float(shifted_nll_sum(model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels])))
                  for ids, labels in examples)
    tokens = 3 + 1 + 1 + 3 + 2
    cpu = torch.device("cpu")
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(sft, "all_reduce_sum", lambda v, d: seen.append(v.clone()) or v)
    for rank in (0, 1):
        sft.evaluate(GradOnlyEngine(model, 1), rows, 2, DistInfo(rank, rank, 2, cpu), 0)
    both = (seen[0] + seen[1]).tolist()
    assert both == pytest.approx([nll, tokens], rel=1e-5)
    one = sft.evaluate(GradOnlyEngine(model, 1), rows, 2, DistInfo(0, 0, 1, cpu), 0)
    assert (one["eval/loss"], one["eval/tokens"]) == (pytest.approx(nll / tokens, rel=1e-5), tokens)
    assert one["eval/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_tiny_sft_loss_falls_and_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # save_total_limit 2 (default); step 7 under the profiler
    out, res = _run(tmp_path, "--set", "logging.profile_step=7", max_steps=60, eval_every=30, save_every=20)
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = rows[0]["train/loss"], sum(r["train/loss"] for r in rows[-5:]) / 5
    assert last < first - 1.5, (first, last)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    assert [e["step"] for e in evals] == [30, 60] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[1]["eval/perplexity"] == pytest.approx(torch.tensor(evals[1]["eval/loss"]).exp().item(), rel=1e-6)
    assert rows[0]["train/lr"] < rows[5]["train/lr"]  # warm-up
    assert all(r["train/tokens_per_s"] > 0 and r["train/grad_norm"] > 0 for r in rows)
    assert "resolved config" in res.stdout and "eval loss" in res.stdout
    assert sorted(p.name for p in out.glob("profile-*")) == ["profile-step-7.json.gz", "profile-step-7.txt"]
    assert "autograd::engine::evaluate_function" in (out / "profile-step-7.txt").read_text()  # a training step

    final = out / "final"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    tok = AutoTokenizer.from_pretrained(final)
    gen = GenerationConfig.from_pretrained(final)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    assert (out / "resolved_config.yaml").is_file() and (out / "data_report.json").is_file()
    assert json.loads((final / "rlhf_checkpoint.json").read_text())["step"] == 60
    # only the newest two checkpoints stay; the final model is the step-60 checkpoint's, bit for bit
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000040", "checkpoint-00000060"]
    assert_same_weights(final, out / "checkpoint-00000060" / "hf")
    # and it was trained: the step-40 weights differ
    a, b = load_file(final / "model.safetensors"), load_file(out / "checkpoint-00000040" / "hf" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # generation through plain transformers works
    ids = tok.apply_chat_template([{"role": "user", "content": "spell cat"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out_ids = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    # attention dropout draws random numbers every step: only a restored RNG reproduces the curve
    dropout = ("--set", "model.from_config.attention_dropout=0.2")
    full, _ = _run(full_dir, *dropout, max_steps=8, save_every=2, save_total_limit=10, eval_every=4)
    # a run that stopped after its step-4 checkpoint: later checkpoints and the final model never got written,
    # but metrics rows past step 4 (and a half-written checkpoint) did
    cut_dir = tmp_path / "cut"
    shutil.copytree(full_dir, cut_dir)
    cut = cut_dir / "out"
    for name in ("checkpoint-00000006", "checkpoint-00000008", "final"):
        shutil.rmtree(cut / name)
    (cut / "checkpoint-00000006").mkdir()  # no COMPLETE marker: must be ignored
    cfg = tiny_sft_dict(cut_dir, max_steps=8, save_every=2, save_total_limit=10, eval_every=4)
    res = run_cli("sft", "--config", str(write_yaml(cut_dir / "sft.yaml", cfg)), "--resume", *dropout)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 4" in res.stdout

    def curve(out: Path) -> list[tuple]:
        return [(r["step"], r.get("train/loss"), r.get("train/lr"), r.get("train/grad_norm"), r.get("eval/loss"))
                for r in read_metrics(out / "metrics.jsonl") if "event" not in r]

    assert curve(cut) == curve(full)  # exact, steps 1-8, no duplicated rows
    assert_same_weights(cut / "final", full / "final")


def test_resume_without_checkpoint_starts_fresh_and_rerun_needs_a_flag(tmp_path):
    out, res = _run(tmp_path, "--resume", max_steps=2)
    assert "no complete checkpoint" in res.stdout and (out / "final").is_dir()
    path = tmp_path / "sft.yaml"
    res = run_cli("sft", "--config", str(path))
    assert res.returncode == 2 and "already holds a run" in res.stderr
    res = run_cli("sft", "--config", str(path), "--overwrite", "--set", "train.max_steps=1")
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in _train_rows(out)] == [1]


@pytest.mark.slow
def test_two_processes_zero3_match_one_process_gather_full_weights_and_resume_exactly(tmp_path):
    """--num-gpus 2 runs two DeepSpeed CPU processes under ZeRO-3 (weights, gradients and optimizer state
    partitioned). The loss is the token mean of the whole global batch, so 2 ranks x micro 8 equals 1 rank x
    micro 8 x accumulation 2 without ZeRO, step by step (the from_config model's init too, which a ZeRO-3 build
    under zero.Init would draw differently: 6.184 against 6.179 at step 1): losses and gradient norms (which would differ if the per-rank
    gradient scale were wrong; ZeRO-2's partitioned gradients are checked the same way by the reward model's
    two-process ZeRO-2 test; PPO's two-process tests do not compare with one process). The saved model has full (gathered) tensors, and a checkpoint damaged on one
    rank is passed over by both."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "full").mkdir()
    (tmp_path / "one").mkdir()
    args = ("--num-gpus", "2", "--set", "deepspeed.zero_stage=3")
    train = dict(max_steps=6, micro_batch_size=8, eval_every=3, save_every=3, save_total_limit=5)
    out, res = _run(tmp_path / "full", *args, **train)
    assert "deepspeed.launcher.runner --num_gpus 2" in res.stdout
    assert "Unable to find hostfile" not in res.stdout + res.stderr
    # the workers' shared-memory all-reduce buffers (RAM) are removed once the launcher returns: those named
    # with this run's port (a two-process test on another xdist worker may hold its own at this moment)
    port = re.search(r"--master_port (\d+)", res.stdout).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    rows = _train_rows(out)
    assert len(rows) == 6 and rows[-1]["train/loss"] < rows[0]["train/loss"]
    one, _ = _run(tmp_path / "one", **train, gradient_accumulation_steps=2)
    r1 = _train_rows(one)
    assert [r["train/loss"] for r in rows] == pytest.approx([r["train/loss"] for r in r1], rel=1e-4)
    assert [r["train/grad_norm"] for r in rows] == pytest.approx([r["train/grad_norm"] for r in r1], rel=1e-3)
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info.values()), info
    cfg = json.loads((out / "final" / "config.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 100_000 and cfg["hidden_size"] == 128  # full (gathered) tensors, not ZeRO shards
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the step-6 checkpoint damaged on rank 1 only (its ZeRO-3 optimizer shard truncated): both ranks agree to
    # pass it over before DeepSpeed's loading (whose collectives would otherwise pair one rank's load with the
    # other's error path) and resume from step 3 with two ranks: same curve, same weights
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    cut = tmp_path / "cut" / "out"
    (shard,) = (cut / "checkpoint-00000006" / "ds" / "state").glob("*zero_pp_rank_1_*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[:2000])
    shutil.rmtree(cut / "final")
    cfg = tiny_sft_dict(tmp_path / "cut", **train)
    res = run_cli("sft", "--config", str(write_yaml(tmp_path / "cut" / "sft.yaml", cfg)), *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{shard.name}: " in res.stdout and "(rank 1); trying the previous checkpoint" in res.stdout, res.stdout
    assert "resumed from step 3" in res.stdout
    assert read_metrics(cut / "metrics.jsonl")[-1]["event"] == "final"
    assert [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in _train_rows(cut)] == [
        (r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows
    ]
    assert_same_weights(cut / "final", out / "final")


def test_start_from_a_local_checkpoint_directory_with_packing(tmp_path):
    """A second SFT run whose model is the first run's output directory (its final/ is used), with packing,
    an explicit eval file, length in epochs and a metric row every 2 steps; TensorBoard events are written."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _ = _run(tmp_path / "a", max_steps=30)
    cfg = tiny_sft_dict(tmp_path / "b", max_steps=None, epochs=0.2)
    cfg["model"] = {"name_or_path": str(first)}
    cfg["data"]["packing"] = True
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(7, seed=99)))
    cfg["data"]["eval"] = str(eval_file)
    cfg["logging"].update(tensorboard=True, log_every=2)
    res = run_cli("sft", "--config", str(write_yaml(tmp_path / "b.yaml", cfg)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(cfg["output_dir"])
    assert "packed into" in res.stdout
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["examples"] == 7 and report["train"]["examples"] == 2000  # no holdout taken
    steps = math.ceil(0.2 * (report["train"]["packed_rows"] // 16))
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == list(range(2, steps + 1, 2)) + ([steps] if steps % 2 else [])
    # the tokenizer is the first run's (loaded, not retrained) and the model starts from its weights
    assert (out / "final" / "tokenizer.json").read_text() == (first / "final" / "tokenizer.json").read_text()
    assert not (out / "tokenizer").exists()
    start_loss = _train_rows(out)[0]["train/loss"]
    assert start_loss < _train_rows(first)[0]["train/loss"] - 0.3


def test_data_error_exits_1_naming_the_row_without_traceback(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": ""}\n')
    cfg = tiny_sft_dict(tmp_path, max_steps=1)
    cfg["data"].update({"train": str(data), "format": "auto"})
    res = run_cli("sft", "--config", str(write_yaml(tmp_path / "sft.yaml", cfg)))
    assert res.returncode == 1
    assert f"{data} row 2: empty 'response'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (Path(cfg["output_dir"]) / "final").exists()


@pytest.mark.slow
def test_launcher_returns_the_workers_exit_code(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    cfg = tiny_sft_dict(tmp_path, max_steps=1)
    cfg["data"].update({"train": str(data), "format": "auto"})
    res = run_cli("sft", "--config", str(write_yaml(tmp_path / "sft.yaml", cfg)), "--num-gpus", "2")
    assert res.returncode == 1
    assert f"{data} row 2: invalid JSON" in res.stderr
    assert res.stderr.count("invalid JSON") == 1  # printed once (rank 0), not once per rank
    assert "the launcher exited with code 1" in res.stderr


@pytest.mark.slow
def test_under_the_users_own_launcher(tmp_path):
    """Started by torchrun instead of `rlhf`: rank 0 still prints the resolved config once and prepares the output
    directory (resolved config, refusal to mix runs, the output_dir lock), and the run trains with two ranks."""
    import os
    import subprocess
    import sys

    cfg = tiny_sft_dict(tmp_path, max_steps=2)
    path = write_yaml(tmp_path / "sft.yaml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlhf_cli", "sft",
           "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(cfg["output_dir"])
    assert (out / "resolved_config.yaml").is_file() and (out / "final" / "config.json").is_file()
    printed = re.sub(r"\s+", "", res.stdout)  # (rich wraps a long path at the console's width)
    assert res.stdout.count("rlhf sft: resolved config") == 1 and f"output_dir:{out}" in printed  # rank 0's
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode != 0 and res.stderr.count("already holds a run") == 1
    from stages.checkpoint import run_lock

    with run_lock(out):  # rank 0 takes the lock inside its preparation: every rank learns it is taken, none hangs
        res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0 and res.stderr.count("is in use by another rlhf run") == 1, res.stderr[-3000:]
