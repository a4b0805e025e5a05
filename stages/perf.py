"""Timing, peak memory and model FLOPs of a training process (what `perf/*` metrics and `rlhf bench` report).

Model FLOPs of one forward + backward over `rows` sequences of `length` tokens, R of them scored by the LM
head (the PPO update reads only the response positions through the head):

    flops = 3 x (2 * body * rows * length  +  2 * head * rows * R  +  4 * layers * rows * length^2 * width)

body = weights of the matrix multiplies outside the LM head (every 2-D parameter except embedding tables),
head = the LM head's weight (V x H; counted even when tied to the input embedding, whose lookup is free),
width = attention heads x head size. The attention term counts the full length x length score and value
products (QK^T and AV, 2 FLOPs per multiply-add each), as MFU is usually quoted (no causal halving); the 3 is
one forward plus a backward of twice its cost. Recomputation (activation checkpointing, the checkpointed
log-prob chunks) is hardware work and is not counted: MFU measures useful model work.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

#: dense (not sparse) bf16/fp16 tensor-core peak TFLOP/s by a fragment of torch.cuda.get_device_name() (vendor
#: data sheets); the first fragment found in the name wins, so longer names come before their prefixes
PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
               ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0), ("L4", 121.0))
#: dense float32 peak TFLOP/s without TF32 (the CUDA cores'; torch keeps TF32 off for float32 matrix
#: multiplies unless asked, and this project does not ask), matched like PEAK_TFLOPS
PEAK_FP32_TFLOPS = (("H200 NVL", 60.0), ("H200", 67.0), ("H100 PCIe", 51.0), ("H100 NVL", 60.0), ("H100", 67.0),
                    ("A100", 19.5), ("L40S", 91.6), ("L40", 90.5), ("A10G", 31.2), ("L4", 30.3))
#: memory bandwidth in TB/s (10^12 bytes/s), matched like PEAK_TFLOPS
PEAK_BANDWIDTH_TBS = (("GH200 144G", 4.9), ("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9),
                      ("H100", 3.35), ("A100-SXM4-80GB", 2.039), ("A100-SXM-80GB", 2.039), ("A100 80GB PCIe", 1.935),
                      ("A100", 1.555), ("L40S", 0.864), ("L40", 0.864), ("A10G", 0.6), ("L4", 0.3))


def clock(device: torch.device) -> float:
    """perf_counter() after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """GPU: peak allocated and reserved since the last reset. CPU: the process's peak resident set (since start)."""
    if device.type == "cuda":
        return {"perf/peak_gpu_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "perf/peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"perf/peak_host_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak of a known GPU for matrix multiplies in `dtype` (bf16/fp16: tensor cores; float32: the
    plain float32 peak), else None.

    >>> [peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("NVIDIA H100 80GB HBM3", torch.float32), peak_tflops("cpu")]
    [989.4, 67.0, None]
    """
    table = PEAK_FP32_TFLOPS if dtype == torch.float32 else PEAK_TFLOPS
    return next((v for k, v in table if k in device_name), None)


def peak_bandwidth_tbs(device_name: str) -> float | None:
    """Memory bandwidth of a known GPU in TB/s, else None.

    >>> [peak_bandwidth_tbs(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA L40", "cpu")]
    [3.35, 2.0, 0.864, None]
    """
    return next((v for k, v in PEAK_BANDWIDTH_TBS if k in device_name), None)


class FlopShape(NamedTuple):
    body: int  # matrix-multiply weights outside the LM head
    head: int  # LM-head weight (0 for a value model's 1-wide score head: counted in body)
    layers: int
    width: int  # attention heads x head size


def flop_shape(model: torch.nn.Module, lm_head: bool) -> FlopShape:
    """Count a model's matrix-multiply weights (2-D parameters that are not embedding tables); with `lm_head`
    the output embedding is the head (counted even when tied). ZeRO-3 partitioned parameters count in full."""
    config = model.config
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head_w = model.get_output_embeddings().weight if lm_head else None
    body = 0
    for p in model.parameters():
        shape = getattr(p, "ds_shape", p.shape)
        if len(shape) == 2 and id(p) not in embeddings and p is not head_w:
            body += shape[0] * shape[1]
    head = 0
    if head_w is not None:
        shape = getattr(head_w, "ds_shape", head_w.shape)
        head = shape[0] * shape[1]
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return FlopShape(body, head, layers, heads * head_dim)


def train_flops(shape: FlopShape, rows: int, length: int, scored: int) -> float:
    """Model FLOPs of forward + backward over rows x length tokens with `scored` LM-head positions per row."""
    fwd = 2 * shape.body * rows * length + 2 * shape.head * rows * scored + 4 * shape.layers * rows * length**2 * shape.width
    return 3.0 * fwd


#: CUDA API calls `launch_counts` counts, by kind: prefixes of the names torch.profiler records them under
#: (runtime API `cuda*`, driver API `cu*`, which Triton kernels are launched with)
LAUNCH_KINDS: dict[str, tuple[str, ...]] = {
    "graph_launches": ("cudaGraphLaunch", "cuGraphLaunch"),
    "graph_captures": ("cudaStreamBeginCapture", "cuStreamBeginCapture"),
    "kernel_launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel"),
    "host_syncs": ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cuStreamSynchronize",
                   "cuEventSynchronize", "cuCtxSynchronize"),
    "copies": ("cudaMemcpy", "cuMemcpy"),
}


def count_calls(names: Iterable[str]) -> dict[str, int]:
    """How many of `names` (profiler event names) fall in each of LAUNCH_KINDS.

    >>> count_calls(["cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernelEx", "aten::mm", "cudaMemcpyAsync"])
    {'graph_launches': 1, 'graph_captures': 0, 'kernel_launches': 2, 'host_syncs': 0, 'copies': 1}
    """
    counts = dict.fromkeys(LAUNCH_KINDS, 0)
    for name in names:
        kind = next((k for k, prefixes in LAUNCH_KINDS.items() if name.startswith(prefixes)), None)
        if kind is not None:
            counts[kind] += 1
    return counts


#: the range `launch_counts` marks its function's calls with
COUNTED_RANGE = "rlhf.counted"


def names_inside(events: Iterable[Any], marker: str = COUNTED_RANGE) -> list[str]:
    """Names of the profiler events (torch.profiler FunctionEvents) that lie inside the first host-side
    `marker` range (a record_function's CPU event; its copy on the GPU's timeline is not the window), the
    marker left out: a function's own calls without the profiler's start and stop work around it. With no such
    range, all the names."""
    events = list(events)
    windows = [e.time_range for e in events if e.name == marker and e.device_type == torch.autograd.DeviceType.CPU]
    if not windows:
        return [e.name for e in events]
    lo, hi = windows[0].start, windows[0].end
    return [e.name for e in events if e.name != marker and lo <= e.time_range.start and e.time_range.end <= hi]


def launch_counts(fn: Callable[[], Any], device: torch.device) -> dict[str, int] | None:
    """Run `fn` once under torch.profiler and count its CUDA graph launches and captures, kernel launches, host
    syncs and copies (`count_calls`) inside its COUNTED_RANGE (`names_inside`: not the profiler's own
    synchronize); None off a GPU. What a compiled decoding step should show: one graph launch and no capture
    per step, kernel launches only for the sampling work, no host sync per step."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(COUNTED_RANGE):
            fn()
    return count_calls(names_inside(prof.events()))


def compile_counters() -> dict[str, int]:
    """torch.compile's counters in this process so far: graphs traced (a compiled decoding step: one per
    shape; more means it recompiled) and compiled graphs that run without CUDA graphs although the mode asked
    for them (reduce-overhead; on a CPU every such graph counts)."""
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


#: what `StepProfiler` files are named with (a fresh run in an output directory removes them)
PROFILE_PREFIX = "profile-step-"


def profile_paths(out: Path, step: int, rank: int = 0) -> tuple[Path, Path]:
    """Where `StepProfiler` writes step `step`'s trace and table."""
    stem = f"{PROFILE_PREFIX}{step}" + (f"-rank{rank}" if rank else "")
    return out / f"{stem}.json.gz", out / f"{stem}.txt"


class StepProfiler:
    """torch.profiler over one training step's training work (logging.profile_step, 1-based; 0 = never): CPU
    ops and, on a GPU, CUDA kernels and API calls. A step loop calls `begin(step)` at the top of every step,
    which starts it for the chosen step, and `close()` where the step's training work ends (before evaluation
    and checkpoints), which stops it (once; later calls do nothing) and writes into the output directory

        profile-step-N.json.gz   the Chrome trace of that step (ui.perfetto.dev or chrome://tracing)
        profile-step-N.txt       its ops and kernels by total time (torch.profiler's table, 60 rows)

    (names ending in -rankR on ranks other than 0). The profiled step's own timings include the profiler's
    overhead. Used as a context manager around the step loop, it also writes the profile of a step that ends in
    an error (up to the failing op: often the trace one wants most), before the error goes on. A failed write is
    a warning: a profile is not worth a training run."""

    def __init__(self, step: int, out: Path, rank: int, device: torch.device) -> None:
        self.step, self.device = step, device
        self.trace, self.table = profile_paths(out, step, rank)
        self._prof: Any = None

    def begin(self, step: int) -> None:
        self.close()
        if self.step and step == self.step:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """Close (write the profile of a step the loop left in an error, too); the loop's error goes on."""
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - e.g. the synchronize after a CUDA error
            if exc_type is None:
                raise
            print(f"warning: no profile of step {self.step}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a CUDA error of the step surfaces here
        prof.__exit__(None, None, None)
        sort_by = "device_time_total" if self.device.type == "cuda" else "cpu_time_total"
        try:
            averages = prof.key_averages()
            if self.device.type == "cuda" and not gpu_time_recorded(averages):
                print(f"warning: the profile of step {self.step} holds no GPU kernels: the profiler could not trace "
                      "them (rerun with KINETO_LOG_LEVEL=2 to read its own messages)", file=sys.stderr)
            self.table.write_text(averages.table(sort_by=sort_by, row_limit=60) + "\n", encoding="utf-8")
            prof.export_chrome_trace(str(self.trace))  # a .gz name: torch writes it gzipped
        except Exception as exc:  # noqa: BLE001 - OSError, or the profiler's own RuntimeError
            print(f"warning: could not write the profile of step {self.step}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


def gpu_time_recorded(averages: Any) -> bool:
    """Whether any op of a profile's `key_averages()` has GPU time (a CUDA profile whose kernels CUPTI could not
    trace, for want of a permission say, has none)."""
    return any(getattr(a, "device_time_total", 0) > 0 for a in averages)


def unwrap(model: Any) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine / ValueModel."""
    inner = getattr(model, "module", model)
    return getattr(inner, "seqcls", inner)
