"""The SFT stage on a CUDA GPU (skipped without one): bf16 with ZeRO 0/2/3, exact resume, loadable checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import run_cli, tiny_sft_dict, write_yaml
from stages.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _gpu_run(folder: Path, *extra: str, **train) -> Path:
    folder.mkdir(exist_ok=True)
    cfg = tiny_sft_dict(folder, **train)
    res = run_cli("sft", "--config", str(write_yaml(folder / "sft.yaml", cfg)), "--set", "deepspeed.precision=bf16",
                  *extra, drop_env=("DS_ACCELERATOR",))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return Path(cfg["output_dir"])


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_bf16_training_on_gpu(tmp_path, zero):
    import torch
    from transformers import AutoModelForCausalLM

    out = _gpu_run(tmp_path, "--set", f"deepspeed.zero_stage={zero}", max_steps=40)
    losses = [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()) and next(model.parameters()).dtype == torch.bfloat16


def test_resume_on_gpu_is_exact(tmp_path):
    train = dict(max_steps=8, save_every=4, save_total_limit=5)
    full = _gpu_run(tmp_path / "full", "--set", "deepspeed.zero_stage=2", **train)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "out" / "checkpoint-00000008")
    shutil.rmtree(tmp_path / "cut" / "out" / "final")
    cut = _gpu_run(tmp_path / "cut", "--set", "deepspeed.zero_stage=2", "--resume", **train)

    def curve(out: Path) -> list:
        return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in read_metrics(out / "metrics.jsonl")
                if "train/loss" in r]

    assert curve(cut) == curve(full)
