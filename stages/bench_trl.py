"""`rlhf bench trl`: TRL's PPOTrainer (the version issue 6 measured, 0.23.1) on a bench workload, timed like
`rlhf bench ppo`, so that the two compare on the same card.

Same models (the workload's policy, copied as the reference; its reward model, copied as the value model),
same prompts, same shapes: B = workload.prompts prompts of prompt_length tokens, exactly new_tokens new tokens
each (no stop token, so no row stops early), one PPO epoch over one mini-batch of B in micro-batches of
`micro_batch_size` (the bench config's ppo.train.micro_batch_size, as `rlhf bench ppo` uses it). TRL's own
defaults otherwise: its sampler (transformers `generate`, dynamic KV cache, temperature 0.7, no top-k or
top-p, the rollout and its scoring in batches of local_rollout_forward_batch_size = 64) and its optimizer
(torch AdamW, whose states take the weights' dtype). Precision (`PRECISIONS`): the workload's weights as
they are (auto: bf16 for W1/W2, pure bf16 training with no fp32 master copy, what loading bf16 checkpoints
gives), or fp32 weights with bf16 autocast (bf16-mixed: TRL's `--bf16` recipe on fp32 weights, set through
accelerate, since TRL 0.23.1 builds its own Accelerator and transformers 5 no longer hands it `bf16`; the
sampler, run on the unwrapped policy, then decodes in fp32), or bf16 / fp32 weights. Which of these issue 6's
TRL figures used is not recorded there.

Timed: each iteration, from the end of the previous one (a trainer callback at each step's end, after a device
sync), and its generation (TRL's `batch_generation`, wrapped with device syncs). The result is the median over
the iterations after `warmup`, as in `rlhf bench ppo`; peak memory is the peak GPU allocation from the start of
training (the four models resident) to its end.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch

from stages.config import BenchConfig, PPOConfig
from stages.errors import RlhfError
from stages.perf import clock, peak_memory_gib, reset_peak_memory

TRL_VERSION = "0.23.1"
#: --precision: (weights' dtype, accelerate's mixed precision); auto: the workload's dtype, no autocast
PRECISIONS: dict[str, tuple[torch.dtype | None, str]] = {
    "auto": (None, "no"), "bf16": (torch.bfloat16, "no"), "bf16-mixed": (torch.float32, "bf16"),
    "fp32": (torch.float32, "no"),
}


def _trl() -> tuple[Any, Any]:
    """trl and trl.trainer.ppo_trainer; an RlhfError when TRL is not installed, or does not import here (a
    version of it written for another transformers: TRL imports its trainers lazily, so that shows on the
    trainer's import or its first use), naming the version this benchmark is written for."""
    try:
        import trl
        import trl.trainer.ppo_trainer as ppo_module

        trl.PPOConfig, trl.PPOTrainer  # noqa: B018 - (TRL's lazy module imports them here)
    except ImportError as exc:
        if exc.name == "trl":
            raise RlhfError(f"rlhf bench trl needs TRL: pip install trl=={TRL_VERSION}") from None
        broken: Exception = exc
    except RuntimeError as exc:  # (how a lazy module says that what it imports on first use failed)
        broken = exc
    else:
        return trl, ppo_module
    raise RlhfError(f"TRL does not import here ({type(broken).__name__}: {broken}); rlhf bench trl is written "
                    f"for trl=={TRL_VERSION}") from None


def run_trl(cfg: BenchConfig, workload: Path, ppo_cfg: PPOConfig, device: torch.device,
            precision: str = "auto") -> dict[str, Any]:
    """Run TRL's PPOTrainer for warmup + iterations iterations on the workload; its timings (module docstring)."""
    import os

    trl, ppo_module = _trl()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from stages.bench import device_info, dtype_name
    from stages.data import BadRowLog
    from stages.distributed import quiet_libraries
    from stages.engine import model_dtype
    from stages.models import load_tokenizer
    from stages.ppo.prompts import load_prompts

    quiet_libraries()  # no weight-loading progress bars of transformers and datasets in the comparison's output
    w = cfg.workload
    dtype, mixed = PRECISIONS[precision]
    dtype = dtype or model_dtype(ppo_cfg.model.dtype, ppo_cfg.deepspeed.precision)
    tok = load_tokenizer(str(workload / "policy"))
    load = {"dtype": dtype}
    policy = AutoModelForCausalLM.from_pretrained(str(workload / "policy"), **load)
    reference = AutoModelForCausalLM.from_pretrained(str(workload / "policy"), **load)
    reward = AutoModelForSequenceClassification.from_pretrained(str(workload / "rm"), num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(str(workload / "rm"), num_labels=1, **load)
    micro = min(ppo_cfg.train.micro_batch_size, w.prompts)
    if w.prompts % micro:
        raise ValueError(f"workload.prompts ({w.prompts}) must be a multiple of the micro-batch size ({micro})")
    runs = cfg.warmup + cfg.iterations
    # more rows than the run takes: accelerate syncs gradients at every micro-batch of a dataloader's last
    # batch, so an iteration that reached it would make one optimizer step per micro-batch
    rows = load_prompts(ppo_cfg.data.train, ppo_cfg.data, tok, BadRowLog()).ids  # as rlhf ppo reads them
    prompts = [rows[i % len(rows)] for i in range(w.prompts * (runs + 1))]
    out_dir = Path(cfg.output_dir) / "trl"
    shutil.rmtree(out_dir, ignore_errors=True)
    with quiet_trl():  # (TrainingArguments' own deprecation warnings)
        args = trl.PPOConfig(
            output_dir=str(out_dir), seed=cfg.seed, per_device_train_batch_size=micro,
            gradient_accumulation_steps=w.prompts // micro, num_mini_batches=1, num_ppo_epochs=1,
            response_length=w.new_tokens, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
            total_episodes=w.prompts * runs, local_rollout_forward_batch_size=min(64, w.prompts),
            bf16=mixed == "bf16", use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
            num_sample_generations=0, logging_steps=1, disable_tqdm=True,
        )
    ends: list[float] = []
    generation: list[float] = []
    widths: list[int] = []  # new tokens per rollout (every row is that long: no stop token)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            reset_peak_memory(device)
            ends.append(clock(device))

        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(clock(device))

    inner = ppo_module.batch_generation

    def timed_generation(*a: Any, **k: Any) -> Any:
        t0 = clock(device)
        result = inner(*a, **k)
        generation.append(clock(device) - t0)
        widths.append(result[0].shape[1] - a[1].shape[1])  # (query_responses, logits) from (model, queries, ...)
        return result

    ppo_module.batch_generation = timed_generation
    env_before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = mixed  # what TRL's own Accelerator() reads
    try:
        with quiet_trl():
            trainer = trl.PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=reference,
                                     reward_model=reward, value_model=value,
                                     train_dataset=Dataset.from_dict({"input_ids": prompts}), callbacks=[Clock()])
            trainer.train()
    finally:
        ppo_module.batch_generation = inner
        if env_before is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = env_before
    per_iteration = [b - a for a, b in zip(ends, ends[1:])]
    if len(per_iteration) != runs or set(widths) != {w.new_tokens}:
        raise ValueError(f"TRL ran {len(per_iteration)} iterations of {sorted(set(widths))} new tokens, expected "
                           f"{runs} of {w.new_tokens}")
    timed, gen = per_iteration[cfg.warmup:], generation[cfg.warmup:]
    it, gen_s = statistics.median(timed), statistics.median(gen)
    return {
        "benchmark": "trl-ppo", "workload": cfg.name, "workload_spec": cfg.workload.model_dump(mode="json"),
        "trl": trl.__version__, "precision": precision, "weights_dtype": dtype_name(dtype),
        "mixed_precision": trainer.accelerator.mixed_precision, **device_info(device),
        "iterations_timed": len(timed), "warmup": cfg.warmup,
        "seconds_per_iteration": it, "generation_s": gen_s, "generation_share": gen_s / it,
        "samples_per_s": w.prompts / it, "generated_tokens_per_s": w.prompts * w.new_tokens / it,
        "peak_memory_gib": next(iter(peak_memory_gib(device).values())),
        "peak_memory_kind": next(iter(peak_memory_gib(device))).removeprefix("perf/"),
        "per_iteration_s": per_iteration, "generation_per_iteration_s": generation,
        "new_tokens": widths[0], "micro_batch_size": micro,
        "rollout_forward_batch_size": args.local_rollout_forward_batch_size,
    }


@contextlib.contextmanager
def quiet_trl() -> Any:
    """TRL's PPOTrainer without its chatter in the comparison's output: its prints ("===training policy===", each
    step's metrics dict: the result has the timings) and the deprecation warnings transformers and torch raise
    inside it (FutureWarning, torch's non-tuple indexing UserWarning); other warnings and errors still show."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "Using a non-tuple sequence for multidimensional indexing", UserWarning)
        yield


def compare(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any] | None:
    """Speed-up of `rlhf bench ppo` over `rlhf bench trl` on the same workload (name and spec), device and
    weights dtype; None otherwise (e.g. a cut-down `--set workload.prompts=4` run against a full one, or bf16
    weights against float32)."""
    if any(ours.get(k) != trl.get(k) for k in ("workload", "workload_spec", "device", "weights_dtype")):
        return None
    return {"speedup": trl["seconds_per_iteration"] / ours["seconds_per_iteration"],
            "generation_speedup": trl["generation_s"] / ours["split_seconds"]["generation"],
            "trl_seconds_per_iteration": trl["seconds_per_iteration"], "trl_peak_memory_gib": trl["peak_memory_gib"],
            "trl_precision": trl["precision"], "uneven_host_load": uneven_host_load(ours, trl)}


def uneven_host_load(ours: dict[str, Any], trl: dict[str, Any]) -> str | None:
    """Why the two timings may not compare, when the host was busier for one than for the other by at least half
    the cores: other processes took CPU time from one of them (torch's threads, a GPU's kernel launches). The
    cores other processes kept busy as each benchmark started (host_busy_cores_before), else, for a result
    written without them, the 1-minute load averages read as each result was written (its own run included).
    None otherwise, or when a figure is unknown."""
    before = all(r.get("host_busy_cores_before") is not None for r in (ours, trl))
    key = "host_busy_cores_before" if before else "host_load_1min"
    a, b, cores = ours.get(key), trl.get(key), ours.get("host_cores") or 1
    if a is None or b is None or abs(a - b) < 0.5 * cores:
        return None
    what = ("{} cores busy before rlhf bench {}" if before else "a load average of {} after rlhf bench {}")
    return (f"the host had {what.format(f'{a:.1f}', 'ppo')} and {what.format(f'{b:.1f}', 'trl')}, on {cores} "
            "cores: rerun the busier one on a quiet machine before trusting the ratio")
