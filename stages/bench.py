"""`rlhf bench`: time the real `rlhf ppo` code path, or the rollout sampler alone, on a synthetic workload.

A workload (configs/bench/*.yaml, schema BenchConfig) is an architecture, a prompt count and length, and a
response length. It is built once into output_dir/workload (reused while the workload is unchanged):

    tokenizer/  a word-level tokenizer naming every row of the architecture's vocabulary (pad, EOS and words
                w0, w1, ...; 151,936 ids for W1), so a prompt of n words is exactly n tokens, and the sampler
                draws, and the log-probs normalise, over the whole vocabulary as with a real tokenizer
    policy/     a random-init causal LM of the architecture
    rm/         a random-init sequence classifier of the same architecture (reward model and critic)
    prompts.jsonl

`bench ppo` then writes a PPO config for these (output_dir/ppo.yaml, stages.bench_config; the bench config's
`ppo:` keys merged on top), runs `rlhf ppo` in this process for warmup + iterations iterations, and reads the
per-iteration `perf/*` metrics back: medians over the timed iterations. Every response is exactly `new_tokens` long
(min_new_tokens = max_new_tokens), so the timed work is the same in every iteration and in every tool.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from stages.config import BenchConfig, PPOConfig
from stages.errors import RlhfError
from stages.metrics import read_metrics
from stages.perf import (
    clock,
    compile_counters,
    launch_counts,
    peak_bandwidth_tbs,
    peak_memory_gib,
    peak_tflops,
    profile_paths,
    reset_peak_memory,
)
from stages.roofline import Floor, decode_shape, meta_model, ppo_floors, report

WORKLOAD_STAMP = "workload.json"


# --------------------------------------------------------------------------------------------- workload
def word_tokenizer(words: int) -> Any:
    """Word-level tokenizer of words + 2 ids: 0 = <|pad|>, 1 = <|endoftext|>, 2.. = w0 w1 ...; whitespace-split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|endoftext|>": 1} | {f"w{i}": i + 2 for i in range(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


def _stamp(cfg: BenchConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {"workload": cfg.workload.model_dump(mode="json"), "seed": cfg.seed, "dtype": str(dtype),
            "tokenizer": "every row"}  # (workloads built before it named `words` + 2 rows only)


def workload_model_config(cfg: BenchConfig) -> Any:
    """The transformers config of the workload's models (the word tokenizer's pad id 0 and EOS id 1)."""
    from transformers import AutoConfig

    arch = dict(cfg.workload.architecture)
    return AutoConfig.for_model(arch.pop("model_type"), **arch, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def workload_floors(cfg: BenchConfig, epochs: int, dtype: torch.dtype, peak: float,
                    bandwidth: float) -> dict[str, Floor]:
    """Roofline floors of one PPO iteration of the workload (`roofline.ppo_floors`: all four models of its
    architecture, exactly new_tokens per response, `epochs` PPO epochs) at `peak` TFLOP/s and `bandwidth` TB/s."""
    config = workload_model_config(cfg)
    w = cfg.workload
    return ppo_floors(decode_shape(meta_model(config, dtype)), config.hidden_size, w.prompts, w.prompt_length,
                      w.new_tokens, epochs, peak, bandwidth)


def prepare_workload(cfg: BenchConfig, dtype: torch.dtype) -> Path:
    """Build (or reuse) output_dir/workload; returns it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = Path(cfg.output_dir) / "workload"
    stamp = _stamp(cfg, dtype)
    if (root / WORKLOAD_STAMP).exists() and json.loads((root / WORKLOAD_STAMP).read_text()) == stamp:
        return root
    w = cfg.workload
    config = workload_model_config(cfg)
    if config.vocab_size < w.words + 2:  # (before anything is deleted)
        raise ValueError(f"workload.architecture.vocab_size ({config.vocab_size}) is below workload.words + 2")
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.with_name(".tmp-workload")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = word_tokenizer(config.vocab_size - 2)  # the prompts use the first `words` of them
    plain = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    init_on = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # random init is slow on CPU
    for name, cls, extra in (("policy", AutoModelForCausalLM, {}), ("rm", AutoModelForSequenceClassification,
                                                                      {"num_labels": 1})):
        torch.manual_seed(cfg.seed)
        with init_on:
            model = cls.from_config(config.__class__(**plain, **extra), dtype=dtype)
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        del model
    rng = random.Random(cfg.seed)
    with (tmp / "prompts.jsonl").open("w", encoding="utf-8") as fh:
        for _ in range(w.prompts * 4):
            fh.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(w.words)}" for _ in range(w.prompt_length))}) + "\n")
    (tmp / WORKLOAD_STAMP).write_text(json.dumps(stamp), encoding="utf-8")
    tmp.rename(root)
    return root


# --------------------------------------------------------------------------------------------- results
def device_info(device: torch.device) -> dict[str, Any]:
    """The device, and how busy the host was (`host_load`, read when the result is written)."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, **host_load(), **versions()}
    return {"device": "cpu", "threads": torch.get_num_threads(), **host_load(), **versions()}


def versions() -> dict[str, Any]:
    """{"versions": {package: version}} of what a result depends on (rlhf, torch, transformers, deepspeed)."""
    from stages.runtime import package_version

    return {"versions": {name: package_version(name) for name in ("rlhf", "torch", "transformers", "deepspeed")}}


def dtype_name(dtype: torch.dtype) -> str:
    """`weights_dtype` as bench results record it ("bfloat16"): `bench trl` compares only results that agree."""
    return str(dtype).removeprefix("torch.")


def host_load() -> dict[str, Any]:
    """{"host_cores": the CPU count, "host_load_1min": the 1-minute load average (None where the OS has none)}."""
    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"host_cores": os.cpu_count() or 1, "host_load_1min": load}


def busy_cores(seconds: float = 0.5, stat: str = "/proc/stat") -> float | None:
    """How many cores other processes keep busy now: the share of CPU time not idle (nor waiting on I/O) over
    `seconds`, from /proc/stat's first line read before and after, times the core count. This process sleeps
    meanwhile, so the figure is the others' work (a 1-minute load average also counts, for about a minute, a
    benchmark that has just ended), within [0, cores]. None where /proc/stat cannot be read (not Linux) or its
    counters do not move (a sandbox's static file)."""
    import time

    def ticks() -> tuple[int, int]:
        with open(stat, encoding="ascii") as fh:  # cpu user nice system idle iowait irq softirq steal [guest ...]
            values = [int(v) for v in fh.readline().split()[1:9]]  # (guest time is counted in user already)
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # (all, idle + iowait)

    try:
        total0, idle0 = ticks()
        time.sleep(seconds)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    elapsed, cores = total1 - total0, os.cpu_count() or 1
    if elapsed <= 0:
        return None
    return round(min(max(1 - (idle1 - idle0) / elapsed, 0.0), 1.0) * cores, 2)  # (iowait may run backwards)


def device_peaks(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(TFLOP/s, TB/s) of the device for matrix multiplies in `dtype`: the config's, else a known GPU's (the
    plain float32 peak for float32), else None."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return (cfg.peak_tflops or (peak_tflops(name, dtype) if name else None),
            cfg.peak_bandwidth_tbs or (peak_bandwidth_tbs(name) if name else None))


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def fit_on_device(estimate: dict[str, Any] | None, device: torch.device) -> int | None:
    """What `--fit-micro-batch` would choose on this GPU: the largest micro-batch whose estimated peak
    (`estimate["peak_at_micro_batch"]`) fits its total memory (stages/memory.py: largest_fitting_micro_batch);
    None on a CPU, or without those peaks."""
    from stages.memory import largest_fitting_micro_batch

    if device.type != "cuda" or not estimate or not estimate.get("peak_at_micro_batch"):
        return None
    return largest_fitting_micro_batch(estimate, torch.cuda.get_device_properties(device).total_memory)


def summarize_ppo(cfg: BenchConfig, ppo_cfg: PPOConfig, metrics_file: Path, device: torch.device,
                  estimate: dict[str, Any] | None) -> dict[str, Any]:
    """Medians of the timed iterations: the policy iterations (after ppo.critic_pretrain_steps critic-only
    ones) after the first `warmup`, up to warmup + iterations, the profiled one (logging.profile_step) left out;
    throughput, peak memory and MFU; with the device's peaks known, each phase's roofline floor and gap
    (`roofline.ppo_floors`)."""
    every = [r for r in read_metrics(metrics_file) if "perf/iteration_s" in r]
    first = ppo_cfg.ppo.critic_pretrain_steps  # steps 1..first update the critic only
    profile_step = ppo_cfg.logging.profile_step
    rows = [r for r in every if first < r["step"] <= first + cfg.warmup + cfg.iterations and r["step"] != profile_step]
    timed = [r for r in rows if r["step"] > first + cfg.warmup]
    if not timed:
        raise ValueError(f"no timed iterations in {metrics_file}")
    it = _median(timed, "perf/iteration_s") or 0.0
    split = {k: _median(timed, f"perf/{k}_s") for k in ("generation", "scoring", "policy_update", "critic_update")}
    samples = ppo_cfg.train.rollout_batch_size
    new_tokens = statistics.median(r["rollout/response_length"] for r in timed) * samples
    peak_key = "perf/peak_gpu_allocated_gib" if device.type == "cuda" else "perf/peak_host_rss_gib"
    tflops = _median(timed, "perf/update_tflops")
    from stages.engine import compute_dtype, model_dtype

    dtype = model_dtype(ppo_cfg.model.dtype, ppo_cfg.deepspeed.precision)
    peak, bandwidth = device_peaks(cfg, device, compute_dtype(ppo_cfg.model.dtype, ppo_cfg.deepspeed.precision))
    floors = None
    if peak and bandwidth:
        floors = report(workload_floors(cfg, ppo_cfg.ppo.ppo_epochs, dtype, peak, bandwidth), split | {"iteration": it})
    return {
        "benchmark": "ppo", "workload": cfg.name, "workload_spec": cfg.workload.model_dump(mode="json"),
        **device_info(device), "weights_dtype": dtype_name(dtype),
        "precision": ppo_cfg.deepspeed.precision, "generation": ppo_cfg.generation.model_dump(mode="json"),
        "iterations_timed": len(timed), "warmup": cfg.warmup,
        "seconds_per_iteration": it,
        "split_seconds": split,
        "split_share": {k: (v / it if v is not None and it else None) for k, v in split.items()},
        "samples_per_s": samples / it if it else None,
        "generated_tokens_per_s": new_tokens / it if it else None,
        "generation_tokens_per_s": new_tokens / split["generation"] if split["generation"] else None,
        "update_tflops": tflops,
        "peak_tflops": peak,
        "mfu_update": tflops / peak if tflops is not None and peak else None,
        "peak_bandwidth_tbs": bandwidth,
        "floors": floors,
        "peak_memory_gib": max(r.get(peak_key, 0.0) for r in timed),
        "peak_memory_kind": peak_key.removeprefix("perf/"),
        "estimated_memory_gib": estimate["total"] / 2**30 if estimate else None,
        "estimate_parts_gib": {k: v / 2**30 for k, v in estimate["parts"].items()} if estimate else None,
        "micro_batch_size": ppo_cfg.train.micro_batch_size,
        "fit_micro_batch": fit_on_device(estimate, device),
        "per_iteration_s": [r["perf/iteration_s"] for r in rows],
        "profiled_iteration_s": next((r["perf/iteration_s"] for r in every if r["step"] == profile_step), None),
        **compile_counters(),
    }


# --------------------------------------------------------------------------------------------- generate
#: the decoding paths `bench_generate` times
VARIANTS = ("static", "fused", "dynamic")


def bench_generate(cfg: BenchConfig, workload: Path, ppo_cfg: PPOConfig, device: torch.device,
                   caches: list[str]) -> dict[str, Any]:
    """Time `sample` (the rollout sampler of rlhf ppo) on the workload's prompts with the PPO config's
    generation settings, for each decoding path in `caches` (VARIANTS: the static cache, compiled when
    generation.compile; `fused`: compiled with the sampling inside, generation.compile_sampling, best timed
    last; the dynamic reference). A path that fails (a compile, a CUDA graph) has its error as its result and
    the others are still timed; only a failure of every path is an error. On a GPU, count one more rollout's
    CUDA graph launches, kernel launches and host syncs (`launch_counts`) of each path but the dynamic one. With the device's peaks known (a known GPU, or the
    config's), the rollout's roofline floor (`roofline.generation_floor`) and each path's gap to it."""
    from transformers import AutoModelForCausalLM

    from stages.engine import model_dtype
    from stages.models import load_tokenizer
    from stages.ppo.prompts import load_prompts
    from stages.data import BadRowLog
    from stages.ppo.rollout import left_pad, sample

    tok = load_tokenizer(str(workload / "policy"))
    dtype = model_dtype(ppo_cfg.model.dtype, ppo_cfg.deepspeed.precision)
    model = AutoModelForCausalLM.from_pretrained(str(workload / "policy"), dtype=dtype,
                                                 attn_implementation=ppo_cfg.model.attn_implementation)
    model.to(device).eval()
    prompts = load_prompts(ppo_cfg.data.train, ppo_cfg.data, tok, BadRowLog()).ids
    ids, mask = left_pad(prompts[:cfg.workload.prompts], tok.pad_token_id, device)
    results: dict[str, Any] = {"benchmark": "generate", "workload": cfg.name,
                               "workload_spec": cfg.workload.model_dump(mode="json"), **device_info(device),
                               "weights_dtype": dtype_name(dtype),
                               "prompts": ids.shape[0], "prompt_length": ids.shape[1]}
    unknown = [c for c in caches if c not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown decoding path(s) {unknown}; known: {', '.join(VARIANTS)}")
    def generation(variant: str) -> Any:  # the config's sampling on this decoding path (VARIANTS)
        if variant == "fused":
            return ppo_cfg.generation.model_copy(update={"cache": "static", "compile": True, "compile_sampling": True})
        return ppo_cfg.generation.model_copy(update={"cache": variant, "compile_sampling": False,
                                                      "compile": ppo_cfg.generation.compile and variant == "static"})

    for variant in caches:
        gen = generation(variant)
        times, tokens = [], 0
        reset_peak_memory(device)
        try:
            for i in range(cfg.warmup + cfg.iterations):
                torch.manual_seed(cfg.seed + i)
                t0 = clock(device)
                roll = sample(model, ids, mask, gen, [tok.eos_token_id], tok.pad_token_id, len(tok))
                seconds = clock(device) - t0
                if i >= cfg.warmup:
                    times.append(seconds)
                    tokens = int(roll.response_mask.sum())
        except Exception as exc:  # noqa: BLE001 - one path may fail (a compile, a CUDA graph) where the others run
            results[variant] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        med = statistics.median(times)
        results[variant] = {"compile": gen.compile, "compile_sampling": gen.compile_sampling, "seconds": med,
                            "tokens": tokens, "tokens_per_s": tokens / med, "per_run_s": times,
                            **{k.removeprefix("perf/"): v for k, v in peak_memory_gib(device).items()}}
    failed = [c for c in caches if "seconds" not in results[c]]
    caches = [c for c in caches if "seconds" in results[c]]  # the paths that ran
    if not caches:
        raise RlhfError("every decoding path failed: " + "; ".join(f"{c}: {results[c]['error']}" for c in failed))
    if "static" in caches and "dynamic" in caches:
        results["static_speedup"] = results["dynamic"]["seconds"] / results["static"]["seconds"]
    if "static" in caches and "fused" in caches and results["static"]["compile"]:  # compiled against compiled
        results["fused_speedup"] = results["static"]["seconds"] / results["fused"]["seconds"]
    peak, bandwidth = device_peaks(cfg, device, dtype)
    results |= {"peak_tflops": peak, "peak_bandwidth_tbs": bandwidth, "floor": None}
    if peak and bandwidth:
        floor = workload_floors(cfg, 1, dtype, peak, bandwidth)["generation"]
        results["floor"] = report({"generation": floor}, {})["generation"]
        for cache in caches:
            results[cache]["gap"] = results[cache]["seconds"] / floor.seconds
    vocab = model.get_output_embeddings().weight.shape[0]

    def per_step(gen: Any) -> float:  # one decoding step's sampling work with these settings
        return time_draw(gen, ids.shape[0], vocab, len(tok), cfg.workload.new_tokens, dtype, device,
                         cfg.warmup + cfg.iterations)

    draw = per_step(ppo_cfg.generation)
    results["sampling"] = {"seconds_per_step": draw, "logits_shape": [ids.shape[0], vocab]}
    if ppo_cfg.generation.compile and ppo_cfg.generation.top_p < 1.0:  # its top-p floor searched, compiled: the
        #                                                                 same work with eager mode's sort beside it
        results["sampling"]["seconds_per_step_sorted"] = per_step(
            ppo_cfg.generation.model_copy(update={"compile": False}))
    for cache in caches:
        if cache != "fused":  # its sampling work runs inside the compiled step
            results[cache]["sampling_share"] = draw * cfg.workload.new_tokens / results[cache]["seconds"]
    # after all timing (a profiler leaves CUPTI loaded), one more rollout of each fast path (else of the first
    # path timed) under the profiler: CUDA graph and kernel launches and host syncs per generated token
    for variant in [c for c in caches if c != "dynamic"] or caches[:1]:
        gen = generation(variant)
        rolled: list[Any] = []
        try:
            launches = launch_counts(lambda: rolled.append(sample(model, ids, mask, gen, [tok.eos_token_id],
                                                                  tok.pad_token_id, len(tok))), device)
        except Exception as exc:  # noqa: BLE001 - as above
            results[variant]["launches_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        if launches is not None:
            width = rolled[0].response.shape[1]
            results[variant] |= {"launches": launches,
                                 "launches_per_token": {k: v / width for k, v in launches.items()}}
    return results | compile_counters()


@torch.no_grad()  # as in sampling: a compiled top-p floor compiled there is not recompiled for grad mode
def time_draw(gen: Any, batch: int, width: int, vocab_size: int, steps: int, dtype: torch.dtype,
              device: torch.device, reps: int) -> float:
    """Median seconds of one decoding step's sampling work (`draw_tokens`: masks, repetition penalty,
    temperature, top-k/top-p, the draw) on random logits [batch, width] of the model's dtype in its place, at
    the last of `steps` steps (a full response of earlier tokens to penalise): the part of a decoding step
    that is not the forward pass."""
    from stages.ppo.rollout import DrawState, draw_tokens

    rng = torch.Generator(device).manual_seed(0)
    state = DrawState.start(batch, steps, width, [1], device)
    state.history.copy_(torch.randint(0, vocab_size, state.history.shape, device=device, generator=rng))
    logits = torch.randn(batch, width, device=device, generator=rng).to(dtype)
    times = []
    for i in range(max(reps, 3) + 2):
        t0 = clock(device)
        draw_tokens(logits, state, steps - 1, gen, vocab_size, 0)
        if i >= 2:  # warm-up
            times.append(clock(device) - t0)
    return statistics.median(times)


def copy_profile(ppo_cfg: PPOConfig, target: Path) -> dict[str, str]:
    """The profiled iteration's trace and table (logging.profile_step), copied beside the result file `target`
    as <stem>-profile.json.gz and <stem>-profile.txt; {} when the run profiled nothing."""
    step = ppo_cfg.logging.profile_step
    trace, table = profile_paths(Path(ppo_cfg.output_dir), step)
    if not step or not trace.exists():
        return {}
    target.parent.mkdir(parents=True, exist_ok=True)
    copies = {"trace": target.with_name(f"{target.stem}-profile.json.gz"),
              "table": target.with_name(f"{target.stem}-profile.txt")}
    shutil.copyfile(trace, copies["trace"])
    shutil.copyfile(table, copies["table"])
    return {k: str(v) for k, v in copies.items()}
