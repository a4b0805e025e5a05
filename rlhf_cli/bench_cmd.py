"""`rlhf bench ppo`, `generate`, `trl`, `floor` and `trace` (stages/bench.py, bench_trl.py, roofline.py and trace.py
do the work)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rlhf_cli.config_loader import dump_config, load_config
from rlhf_cli.gpu_memory import out_of_memory_message
from rlhf_cli.output import err, fail, out, print_error
from stages.config import output_file
from stages.errors import ConfigError, RlhfError, is_out_of_memory


def write_result(result: dict[str, Any], path: Path) -> None:
    """A bench result as indented JSON at `path` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


bench_app = typer.Typer(
    help="Time the PPO code path, its rollout sampler or TRL's PPOTrainer on a synthetic workload "
    "(configs/bench/); print the roofline floors of a workload; summarise a profiled step's trace.",
    no_args_is_help=True, rich_markup_mode="rich",
)

#: where --workload NAME looks (the repository's configs/bench)
WORKLOAD_DIR = Path(__file__).resolve().parent.parent / "configs" / "bench"

WorkloadOpt = Annotated[Optional[str], typer.Option("--workload", "-w", help="Built-in workload: configs/bench/NAME.yaml "
                                                    "(w1, w2, tiny).", show_default="none")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A bench config file instead of --workload.",
                                                   show_default="none")]
ItersOpt = Annotated[Optional[int], typer.Option("--iters", min=1, help="Timed iterations.", show_default="the config's")]
WarmupOpt = Annotated[Optional[int], typer.Option("--warmup", min=0, help="Untimed iterations first.",
                                                  show_default="the config's")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a bench config key: key.path=value; "
                                                     "rlhf ppo keys go under ppo., e.g. ppo.train.micro_batch_size=8.",
                                                     show_default="no overrides")]
OutOpt = Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Result JSON (the workload's models and run stay in OUTPUT_DIR: "
                                                          "--set output_dir=DIR moves them).",
                                           show_default="OUTPUT_DIR/bench-<kind>.json")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.", show_default="off")]


def bench_config(workload: str | None, config: Path | None, iters: int | None, warmup: int | None,
                 overrides: list[str]) -> Any:
    """The validated BenchConfig from --workload or --config, with --set/--iters/--warmup applied, and the PPO
    config its `ppo:` section makes (`check_ppo_section`) valid; both checked before the workload's
    architecture (whose check imports transformers: seconds), so that a typo in either is said at once."""
    if (workload is None) == (config is None):
        raise ConfigError("give exactly one of --workload NAME and --config FILE")
    if workload is not None:
        config = WORKLOAD_DIR / f"{workload}.yaml"
        if not config.is_file():
            known = sorted(p.stem for p in WORKLOAD_DIR.glob("*.yaml"))
            raise ConfigError(f"--workload {workload}: unknown; known workloads: {', '.join(known)}")
        # its output under the current directory (as a --set path), not beside the installed package's configs
        overrides = [f"output_dir=runs/bench/{workload}", *overrides]
    extra = [f"iterations={iters}"] * (iters is not None) + [f"warmup={warmup}"] * (warmup is not None)
    sets = [*overrides, *extra]
    check_ppo_section(load_config("bench", config, sets, architecture=False))  # type: ignore[arg-type]
    return load_config("bench", config, sets)  # type: ignore[arg-type]


def ppo_config(cfg: Any, workload_dir: Path) -> Any:
    """Write output_dir/ppo.yaml for the workload and load it like `rlhf ppo --config` would (presets,
    validation, errors naming the key)."""
    from stages.bench_config import ppo_config_dict
    from stages.yamlio import dump_yaml

    path = Path(cfg.output_dir) / "ppo.yaml"  # (read back as it is written: a float-looking string stays a string)
    path.write_text(dump_yaml(ppo_config_dict(cfg, workload_dir), sort_keys=False), encoding="utf-8")
    try:
        return load_config("ppo", path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n(the PPO config the benchmark generated; its keys come from the bench "
                          "config's ppo: section, e.g. --set ppo.train.micro_batch_size=8)") from None


def check_ppo_section(cfg: Any) -> None:
    """Validate the PPO config a bench config makes (its `ppo:` keys on the benchmark's own, `ppo_config_dict`)
    without building the workload: an unknown key or a bad value is a ConfigError naming the key under `ppo:`."""
    from pydantic import ValidationError

    from rlhf_cli.config_loader import format_validation_error
    from stages.bench_config import ppo_config_dict
    from stages.config import PPOConfig

    try:
        PPOConfig.model_validate(ppo_config_dict(cfg, Path(cfg.output_dir) / "workload"))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(PPOConfig, exc, "(the bench config's ppo: section; keys below "
                                                  "are under ppo:)")) from None


#: a workload whose models have more parameters than this is a GPU's: warned about on a machine without one
CPU_PARAMS = 50_000_000


def warn_if_gpu_sized(cfg: Any) -> None:
    """A warning on stderr when the workload's models are GPU-sized and this machine has no GPU (W1 and W2 run
    for hours on a CPU; the tiny workload is the CPU-sized one)."""
    import torch

    from stages.bench import workload_model_config
    from stages.roofline import decode_shape, meta_model

    if torch.cuda.is_available():
        return
    params = decode_shape(meta_model(workload_model_config(cfg), torch.float32)).params
    if params > CPU_PARAMS:
        err.print(f"[yellow]warning:[/] no GPU here, and each of workload {cfg.name}'s four models has "
                  f"{params / 1e6:.0f}M parameters: on a CPU this runs for hours (`--workload tiny` is sized for "
                  "one; --set workload.prompts=4 --set workload.prompt_length=16 --set workload.new_tokens=8 --set "
                  "ppo.train.micro_batch_size=4 --set ppo.train.forward_batch_size=4 cuts this one down)",
                  highlight=False)


def warn_if_host_busy() -> float | None:
    """How many cores other processes keep busy as the benchmark starts (`busy_cores`; where it cannot be read,
    the 1-minute load average), which the result records as host_busy_cores_before, and a warning on stderr when
    it is at least half the core count: the timings would be those of a shared machine (torch's threads wait on
    each other; a GPU benchmark's kernel launches wait for a core)."""
    from stages.bench import busy_cores, host_load

    load, busy = host_load(), busy_cores()
    now = busy if busy is not None else load["host_load_1min"]
    if now is not None and now >= 0.5 * load["host_cores"]:
        what = (f"{now:.1f} of {load['host_cores']} cores busy" if busy is not None else
                f"load average {now:.1f} on {load['host_cores']} cores")
        err.print(f"[yellow]warning:[/] {what} before the benchmark: other "
                  "processes are using the CPU, so these timings will be slower than on an idle machine (recorded "
                  "in the result as host_busy_cores_before)", highlight=False)
    return now


def _setup(workload: str | None, config: Path | None, iters: int | None, warmup: int | None,
           overrides: list[str]) -> tuple[Any, Any, Path, float | None]:
    """The bench config, the workload built (its PPO config and folder), and how many cores other processes kept
    busy as it started (`warn_if_host_busy`). The config is loaded before anything imports the code that builds
    and runs the workload (torch, transformers, DeepSpeed: seconds; each command imports its own after this), so
    a config error is said at once."""
    cfg = bench_config(workload, config, iters, warmup, overrides)
    from stages.bench import prepare_workload
    from stages.bench_config import ppo_config_dict
    from stages.checkpoint import ensure_dir
    from stages.distributed import quiet_libraries
    from stages.engine import model_dtype
    from stages.runtime import select_accelerator_env

    select_accelerator_env()
    quiet_libraries()  # (no progress bars of transformers' weight writing and loading in the benchmark's output)
    ensure_dir(Path(cfg.output_dir))
    merged = ppo_config_dict(cfg, Path(cfg.output_dir) / "workload")
    precision = merged["deepspeed"].get("precision", "bf16")
    warn_if_gpu_sized(cfg)
    busy_before = warn_if_host_busy()
    with out.status(f"building workload {cfg.name} in {cfg.output_dir}/workload"):
        root = prepare_workload(cfg, model_dtype("auto", precision))
    return cfg, ppo_config(cfg, root), root, busy_before


def _device() -> Any:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _warn_uneven(vs: dict[str, Any]) -> None:
    """The comparison's caveat (`uneven_host_load`), as a warning on stderr."""
    if vs.get("uneven_host_load"):
        err.print(f"[yellow]warning:[/] {escape(vs['uneven_host_load'])}", highlight=False)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@bench_app.command("ppo")
def bench_ppo(workload: WorkloadOpt = None, config: ConfigOpt = None, iters: ItersOpt = None, warmup: WarmupOpt = None,
              set_: SetOpt = None, out_file: OutOpt = None, debug: DebugOpt = False) -> None:
    """Run `rlhf ppo` on the workload (one process) and report the median seconds per iteration, its split (generation / scoring / policy update / critic update), samples/s, tokens/s, peak memory against the --dry-run estimate, the update's model FLOP utilisation, and (on a known GPU, or with the config's peak_tflops and peak_bandwidth_tbs) each phase's roofline floor and the gap to it; with the config's profile (default on), one more iteration's torch.profiler trace and kernel table beside the result.

    Example: [bold]rlhf bench ppo --workload w1[/]  (JSON in runs/bench/w1/bench-ppo.json)
    """  # noqa: E501
    from stages.stop import Stopped

    stopped: Stopped | None = None
    ppo = None
    try:
        out_path = output_file(out_file, "bench-ppo.json")
        cfg, ppo, _, busy_before = _setup(workload, config, iters, warmup, set_ or [])
        from stages.bench import copy_profile, summarize_ppo
        from stages.bench_trl import compare
        from stages.checkpoint import prepare_output_dir
        from stages.memory import estimate, micro_batch_choices
        from stages.ppo.trainer import run

        prepare_output_dir(Path(ppo.output_dir), dump_config(ppo), resume=False, overwrite=True)
        try:
            run(ppo, summary=False)
        except Stopped as exc:  # a time limit's SIGINT: the iterations done still make a (shorter) result
            stopped = exc
        result = summarize_ppo(cfg, ppo, Path(ppo.output_dir) / "metrics.jsonl", _device(),
                               estimate(ppo, 1, micro_batch_choices(ppo)))
        result["stopped"] = str(stopped) if stopped is not None else None
        result["host_busy_cores_before"] = busy_before
        target = out_path or Path(cfg.output_dir) / "bench-ppo.json"
        result["profile"] = copy_profile(ppo, target)
        trl_file = target.with_name("bench-trl.json")
        result["vs_trl"] = compare(result, json.loads(trl_file.read_text())) if trl_file.is_file() else None
        write_result(result, target)
    except (RlhfError, ValueError) as exc:
        fail(stopped or exc, debug)  # (stopped before any timed iteration: the stop is the error to show)
    except RuntimeError as exc:  # out of GPU memory: the one error `rlhf ppo` prints, for the bench's config
        if debug or not is_out_of_memory(exc):
            raise
        print_error(out_of_memory_message(exc, ppo, None))
        raise typer.Exit(1) from None
    table = Table(title=f"rlhf bench ppo: {result['workload']} on {result['device']}")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("seconds per iteration (median)", _fmt(result["seconds_per_iteration"]))
    for k, v in result["split_seconds"].items():
        table.add_row(f"  {k} s (share)", f"{_fmt(v)} ({_fmt(result['split_share'][k])})")
    for k in ("samples_per_s", "generated_tokens_per_s", "generation_tokens_per_s", "update_tflops", "mfu_update",
              "peak_memory_gib", "estimated_memory_gib", "micro_batch_size", "fit_micro_batch", "compiled_graphs",
              "cudagraph_skips"):
        label = {"peak_memory_gib": f"peak_memory_gib ({result['peak_memory_kind']})",
                 "estimated_memory_gib": "estimated_memory_gib (GPU, --dry-run's)",
                 "fit_micro_batch": "fit_micro_batch (--fit-micro-batch's on this GPU)"}.get(k, k)
        table.add_row(label, _fmt(result[k]))
    out.print(table)
    if result["floors"]:
        measured = result["split_seconds"] | {"iteration": result["seconds_per_iteration"]}
        roof = Table(title=f"roofline floors at {result['peak_tflops']} TFLOP/s, {result['peak_bandwidth_tbs']} TB/s")
        for col in ("phase", "measured s", "floor s", "bound", "gap"):
            roof.add_column(col, justify="left" if col in ("phase", "bound") else "right")
        for phase, f in result["floors"].items():
            roof.add_row(phase, _fmt(measured[phase]), _fmt(f["floor_s"]), f["bound"], f"{_fmt(f['gap'])}x")
        out.print(roof)
    if result["vs_trl"]:
        vs = result["vs_trl"]
        out.print(f"vs TRL's PPOTrainer (bench-trl.json, {vs['trl_precision']}: "
                  f"{vs['trl_seconds_per_iteration']:.4g} s per iteration, peak {vs['trl_peak_memory_gib']:.3g} GiB): "
                  f"{_versus(vs['speedup'])}, generation {_versus(vs['generation_speedup'])}", highlight=False)
        _warn_uneven(vs)
    out.print(f"wrote {target}" + "".join(f", {p}" for p in result["profile"].values()), highlight=False)
    if stopped is not None:  # the figures above are from the iterations done; the exit code says it stopped
        err.print(f"[yellow]{escape(str(stopped))}: {result['iterations_timed']} of {cfg.iterations} timed "
                  "iteration(s) done[/]")
        raise typer.Exit(stopped.exit_code)


@bench_app.command("generate")
def bench_generate_cmd(workload: WorkloadOpt = None, config: ConfigOpt = None, iters: ItersOpt = None,
                       warmup: WarmupOpt = None, set_: SetOpt = None,
                       cache: Annotated[Literal["both", "static", "dynamic", "fused", "compiled", "all"], typer.Option(
                           "--cache", help="Decoding path(s) to time: the fast static cache (compiled when the "
                           "config's generation.compile), the dynamic reference, both; fused: compiled with the "
                           "sampling inside (generation.compile_sampling, experimental: a failure is reported, not "
                           "fatal); compiled: static and fused; all: static, dynamic and fused.")] = "both",
                       out_file: OutOpt = None, debug: DebugOpt = False) -> None:
    """Time the rollout sampler alone (the workload's prompts, exactly new_tokens per response): median seconds and tokens/s per KV cache, the static cache's speed-up, one decoding step's sampling work (penalty, temperature, top-k/top-p, draw) timed alone, the rollout's roofline floor and each cache's gap to it (known GPU or configured peaks), and on a GPU the CUDA graph launches, kernel launches and host syncs per token of one profiled rollout.

    Example: [bold]rlhf bench generate --workload w1[/]
    """  # noqa: E501
    try:
        out_path = output_file(out_file, "bench-generate.json")
        cfg, ppo, root, busy_before = _setup(workload, config, iters, warmup, set_ or [])
        from stages.bench import bench_generate

        caches = {"both": ["static", "dynamic"], "compiled": ["static", "fused"],
                  "all": ["static", "dynamic", "fused"]}.get(cache, [cache])
        result = bench_generate(cfg, root, ppo, _device(), caches) | {"host_busy_cores_before": busy_before}
        target = out_path or Path(cfg.output_dir) / "bench-generate.json"
        write_result(result, target)
    except (RlhfError, ValueError) as exc:
        fail(exc, debug)
    for c in caches:
        r = result[c]
        if "error" in r:
            out.print(f"{c:<8} failed: {r['error']}", highlight=False)
            continue
        share = f"  (sampling work {r['sampling_share']:.0%} of it)" if "sampling_share" in r else ""
        out.print(f"{c:<8} compile={r['compile']!s:<5} {r['seconds']:.4f} s  {r['tokens_per_s']:.1f} tokens/s"
                  + share, highlight=False)
        if "launches_per_token" in r:
            out.print("         per token: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}"
                                                         for k, v in r["launches_per_token"].items()), highlight=False)
    out.print(f"sampling work per decoding step (logits {result['sampling']['logits_shape']}): "
              f"{result['sampling']['seconds_per_step'] * 1e3:.3f} ms", highlight=False)
    out.print(f"compiled graphs: {result['compiled_graphs']}, CUDA-graph skips: {result['cudagraph_skips']}",
              highlight=False)
    if "static_speedup" in result:
        out.print(f"static cache speed-up: {result['static_speedup']:.2f}x", highlight=False)
    if "fused_speedup" in result:
        out.print(f"sampling inside the compiled step: {result['fused_speedup']:.2f}x the static path", highlight=False)
    if result["floor"] and any("gap" in result[c] for c in caches):
        f = result["floor"]
        out.print(f"roofline floor: {f['floor_s']:.4f} s ({f['bound']}-bound: {f['tflop']:.3g} TFLOP, "
                  f"{f['gbytes']:.3g} GB at {result['peak_tflops']} TFLOP/s, {result['peak_bandwidth_tbs']} TB/s); gap "
                  + ", ".join(f"{c} {result[c]['gap']:.1f}x" for c in caches if "gap" in result[c]), highlight=False)
    out.print(f"wrote {target}", highlight=False)


@bench_app.command("trl")
def bench_trl_cmd(workload: WorkloadOpt = None, config: ConfigOpt = None, iters: ItersOpt = None,
                  warmup: WarmupOpt = None, set_: SetOpt = None,
                  precision: Annotated[Literal["auto", "bf16", "bf16-mixed", "fp32"], typer.Option(
                      "--precision", help="TRL's weights and autocast: auto = the workload's weights as they are "
                      "(W1/W2: pure bf16), bf16-mixed = fp32 weights with bf16 autocast (TRL's --bf16 recipe), "
                      "bf16, fp32.")] = "auto",
                  out_file: OutOpt = None, debug: DebugOpt = False) -> None:
    """Run TRL's PPOTrainer (pip install trl==0.23.1, the version issue 6 measured) on the same workload, models and shapes as `rlhf bench ppo`, timed the same way: median seconds per iteration, generation time and share, peak memory; with a bench-ppo.json of the same workload and device beside it, the speed-up.

    Example: [bold]rlhf bench trl --workload w1[/]  (JSON in runs/bench/w1/bench-trl.json)
    """  # noqa: E501
    try:
        out_path = output_file(out_file, "bench-trl.json")
        cfg, ppo, root, busy_before = _setup(workload, config, iters, warmup, set_ or [])
        from stages.bench_trl import compare, run_trl

        result = run_trl(cfg, root, ppo, _device(), precision) | {"host_busy_cores_before": busy_before}
        target = out_path or Path(cfg.output_dir) / "bench-trl.json"
        write_result(result, target)
        ours_file = target.with_name("bench-ppo.json")
        vs = compare(json.loads(ours_file.read_text()), result) if ours_file.is_file() else None
    except (RlhfError, ValueError) as exc:
        fail(exc, debug)
    out.print(f"TRL {result['trl']} PPOTrainer ({result['weights_dtype']} weights, mixed precision "
              f"{result['mixed_precision']}), {result['workload']} on {result['device']}: "
              f"{result['seconds_per_iteration']:.4g} s per iteration (median of {result['iterations_timed']}), "
              f"generation {result['generation_s']:.4g} s ({result['generation_share']:.0%}), "
              f"peak memory {result['peak_memory_gib']:.3g} GiB", highlight=False)
    if vs:
        out.print(f"rlhf bench ppo ({ours_file}): {_versus(vs['speedup'])} per iteration, generation "
                  f"{_versus(vs['generation_speedup'])}", highlight=False)
        _warn_uneven(vs)
    elif ours_file.is_file():
        out.print(f"rlhf bench ppo ({ours_file}): not compared (another workload, device or weights dtype)",
                  highlight=False)
    out.print(f"wrote {target}", highlight=False)


def _versus(speedup: float) -> str:
    """A time ratio (TRL's seconds / ours) in words: "3.10x faster", or "2.86x slower" below 1."""
    if not speedup or not math.isfinite(speedup):
        return "n/a"
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


@bench_app.command("floor")
def bench_floor_cmd(workload: WorkloadOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
                    gpu: Annotated[Optional[str], typer.Option("--gpu", help="Price it for this GPU (a name from the "
                                                               "data-sheet tables: H100, H200, A100, ...); without "
                                                               "it: the config's peak_tflops/peak_bandwidth_tbs, else "
                                                               "this machine's GPU.", show_default="none")] = None,
                    debug: DebugOpt = False) -> None:
    """The fewest seconds one PPO iteration of the workload can take on a GPU: each phase's roofline floor (FLOPs over the dense peak for the dtype its trained models compute in: bf16/fp16 tensor cores, or plain float32 without TF32; bytes over memory bandwidth; whichever is larger) and its bound. Builds nothing and needs no GPU; `rlhf bench ppo` prints the same floors next to what it measured.

    Example: [bold]rlhf bench floor --workload w1 --gpu H100[/]
    """  # noqa: E501
    try:
        cfg = bench_config(workload, config, None, None, set_ or [])
        import torch

        from stages.bench import device_peaks, workload_floors
        from stages.bench_config import ppo_config_dict
        from stages.engine import compute_dtype, model_dtype
        from stages.perf import PEAK_BANDWIDTH_TBS, PEAK_TFLOPS, peak_bandwidth_tbs, peak_tflops

        merged = ppo_config_dict(cfg, Path(cfg.output_dir) / "workload")  # the ppo config bench ppo would run
        dtype_args = (merged["model"].get("dtype", "auto"), merged["deepspeed"].get("precision", "bf16"))
        dtype, matmul = model_dtype(*dtype_args), compute_dtype(*dtype_args)
        if gpu:  # --gpu wins over the config's peaks
            name, peak, bandwidth = gpu, peak_tflops(gpu, matmul), peak_bandwidth_tbs(gpu)
        else:  # as bench ppo prices this machine
            name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
            peak, bandwidth = device_peaks(cfg, _device(), matmul)
        if not peak or not bandwidth:
            names = dict.fromkeys(k for table in (PEAK_TFLOPS, PEAK_BANDWIDTH_TBS) for k, _ in table)
            known = sorted(n for n in names if peak_tflops(n, matmul) and peak_bandwidth_tbs(n))  # as --gpu matches
            raise ConfigError(f"no peak FLOP/s and bandwidth for {name or 'this machine (no GPU)'}: give --gpu "
                              f"({', '.join(known)}) or peak_tflops and peak_bandwidth_tbs (--set)")
        floors = workload_floors(cfg, int(merged["ppo"]["ppo_epochs"]), dtype, peak, bandwidth)
    except (RlhfError, ValueError) as exc:
        fail(exc, debug)
    w = cfg.workload
    table = Table(title=f"{cfg.name} ({w.prompts} prompts x {w.prompt_length} tokens, {w.new_tokens} new) at "
                        f"{peak} TFLOP/s, {bandwidth} TB/s")
    for col in ("phase", "floor s", "bound", "TFLOP", "GB moved"):
        table.add_column(col, justify="left" if col in ("phase", "bound") else "right")
    for phase, f in floors.items():
        moved = f"{f.bytes / 1e9:.1f}" if f.bytes else "-"
        table.add_row(phase, f"{f.seconds:.4f}", f.bound, f"{f.flops / 1e12:.2f}", moved)
    out.print(table)


@bench_app.command("trace")
def bench_trace_cmd(
    trace: Annotated[Path, typer.Argument(metavar="TRACE", exists=True, dir_okay=False, help="A profile trace: a *-profile.json.gz of bench ppo, or a "
                                               "profile-step-N.json.gz of logging.profile_step.")],
    top: Annotated[int, typer.Option("--top", min=1, help="GPU kernels to list.")] = 15,
    out_file: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Also write the summary as JSON.",
                                                    show_default="none")] = None,
    debug: DebugOpt = False,
) -> None:
    """Where a profiled step's time went: per named range (rlhf.rollout, rlhf.sampling, rlhf.score, rlhf.update.policy, rlhf.update.critic) its host time, its GPU time, and how busy the GPU was across it (below 100 %: it waited for the host); then the top GPU kernels by time. Reads the trace only: runs anywhere.

    Example: [bold]rlhf bench trace runs/gpu/ppo-w1-profile.json.gz[/]
    """  # noqa: E501
    from stages.trace import load_trace, summarize_trace

    try:
        out_path = output_file(out_file, "trace.json")
    except RlhfError as exc:
        fail(exc, debug)
    try:
        summary = summarize_trace(load_trace(trace), top)
        if out_path is not None:
            write_result(summary, out_path)
    except (OSError, ValueError, KeyError) as exc:
        fail(RlhfError(f"cannot read the trace {trace}: {type(exc).__name__}: {exc}"), debug)
    table = Table(title=f"{trace.name}: {summary['gpu_events']} GPU events, {summary['gpu_ms']:.2f} ms on the GPU")
    for col in ("range", "count", "host ms", "GPU ms (own)", "GPU span ms", "GPU busy"):
        table.add_column(col, justify="left" if col == "range" else "right")
    for name, p in summary["phases"].items():
        table.add_row(name, str(p["count"]), f"{p['host_ms']:.2f}", f"{p['gpu_ms']:.2f}", f"{p['span_ms']:.2f}",
                      f"{p['busy']:.0%}" if p["span_ms"] else "-")
    out.print(table)
    if not summary["phases"]:
        out.print("no rlhf.* ranges in this trace: they mark the phases of a PPO iteration (rlhf ppo, bench ppo); "
                  "an SFT or reward-model step has none")
    if not summary["gpu_events"]:
        out.print("no GPU events: a trace taken on the CPU")
    if summary["top_kernels"]:
        kernels = Table(title=f"top {len(summary['top_kernels'])} GPU kernels")
        for col in ("kernel", "range", "count", "ms", "share"):
            kernels.add_column(col, justify="left" if col in ("kernel", "range") else "right")
        for k in summary["top_kernels"]:
            kernels.add_row(k["name"][:90], k["phase"], str(k["count"]), f"{k['ms']:.2f}", f"{k['share']:.1%}")
        out.print(kernels)
