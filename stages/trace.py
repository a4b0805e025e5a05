"""Where a profiled step's time went, read from its torch.profiler Chrome trace (`logging.profile_step`,
`rlhf bench ppo`'s `*-profile.json.gz`), for `rlhf bench trace`.

A trace holds, among others, these complete ("X") events, timestamps and durations in microseconds:

    user_annotation   a named range on the host (record_function): rlhf.rollout, rlhf.sampling, rlhf.score, ...
    cuda_runtime,     a host call into CUDA (cudaLaunchKernel, cudaGraphLaunch, cudaMemcpyAsync, ...), with
    cuda_driver       args.correlation
    kernel,           work on the GPU, with the args.correlation of the host call that queued it (every kernel of
    gpu_memcpy,       a replayed CUDA graph carries its cudaGraphLaunch's)
    gpu_memset

A GPU event belongs to the innermost `rlhf.*` range around the host call that queued it (so work that runs
after its range has ended on the host still counts for it), else to "other". Per range name, over its
instances (rlhf.sampling: one per decoding step):

    host_ms     summed durations of the ranges on the host
    gpu_ms      summed durations of its own GPU events (nested ranges' events excluded)
    span_ms     summed over the instances: from the first start to the last end of the GPU events of the
                instance and of the ranges nested in it
    busy        the union of those events' intervals, summed over the instances, / span_ms: near 1 = the GPU
                never waited; well below 1 = it waited for the host (launches, syncs) between them

"other" has no instances: its span_ms and busy are 0. On a CPU trace there are no GPU events: gpu_ms,
span_ms and busy are 0.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CALL_CATEGORIES = ("cuda_runtime", "cuda_driver")
RANGE_PREFIX = "rlhf."
OTHER = "other"


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The trace's events (a .json or .json.gz Chrome trace, or a bare event list)."""
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError("not a Chrome trace (no traceEvents list; write one with logging.profile_step)")
    return events


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals.

    >>> union_length([(0, 4), (2, 6), (10, 11)])
    7.0
    """
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _placement(ranges: list[tuple[float, float, str]], t: float | None) -> tuple[str, list[int]]:
    """(the name of the shortest of `ranges` (start, end, name) holding host time t, the indices of all that
    hold it); (OTHER, []) for a time in none of them, or an unknown one."""
    holding = [i for i, (start, end, _) in enumerate(ranges) if t is not None and start <= t <= end]
    if not holding:
        return OTHER, []
    return ranges[min(holding, key=lambda i: ranges[i][1] - ranges[i][0])][2], holding


def summarize_trace(events: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """Per `rlhf.*` range name: host_ms, count, gpu_ms, span_ms, busy (see the module docstring); the `top`
    GPU kernels by total time with the range they belong to; totals."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    ranges = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in complete
                    if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(RANGE_PREFIX))
    calls = {e["args"]["correlation"]: float(e["ts"]) for e in complete
             if e.get("cat") in HOST_CALL_CATEGORIES and "correlation" in e.get("args", {})}
    host: dict[str, list[float]] = defaultdict(list)
    for start, end, name in ranges:
        host[name].append(end - start)
    own: dict[str, float] = defaultdict(float)
    per_range: dict[int, list[tuple[float, float]]] = defaultdict(list)  # GPU intervals of each range instance
    kernels: dict[tuple[str, str], list[float]] = defaultdict(list)
    placed: dict[Any, tuple[str, list[int]]] = {}  # by correlation: a graph's kernels share their launch's
    for e in complete:
        if e.get("cat") not in GPU_CATEGORIES:
            continue
        corr = e.get("args", {}).get("correlation")
        if corr not in placed:
            placed[corr] = _placement(ranges, calls.get(corr))
        phase, holders = placed[corr]
        start, dur = float(e["ts"]), float(e["dur"])
        own[phase] += dur
        kernels[(e["name"], phase)].append(dur)
        for i in holders:
            per_range[i].append((start, start + dur))
    span: dict[str, float] = defaultdict(float)
    covered: dict[str, float] = defaultdict(float)
    for i, intervals in per_range.items():
        name = ranges[i][2]
        span[name] += max(e for _, e in intervals) - min(s for s, _ in intervals)
        covered[name] += union_length(intervals)
    phases: dict[str, dict[str, float]] = {}
    for name in sorted(set(host) | set(own), key=lambda n: (n == OTHER, n)):
        phases[name] = {"count": len(host.get(name, [])), "host_ms": sum(host.get(name, [])) / 1e3,
                        "gpu_ms": own.get(name, 0.0) / 1e3, "span_ms": span[name] / 1e3,
                        "busy": covered[name] / span[name] if span[name] else 0.0}
    gpu_total = sum(own.values())
    ranked = sorted(kernels.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:top]
    return {
        "phases": phases,
        "gpu_ms": gpu_total / 1e3,
        "gpu_events": sum(len(v) for v in kernels.values()),
        "top_kernels": [{"name": name, "phase": phase, "count": len(d), "ms": sum(d) / 1e3,
                         "share": sum(d) / gpu_total if gpu_total else 0.0} for (name, phase), d in ranked],
    }
