"""Hand-valued unit tests of the roofline / perf / trace arithmetic that `tests/test_bench.py` leaves open:
tie-breaking, unit conversions, table lookup order, ZeRO-3 shapes, head_dim, profiler-event windows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages import perf
from stages.perf import count_calls, flop_shape, names_inside, peak_bandwidth_tbs, peak_memory_gib, peak_tflops, unwrap
from stages.roofline import Floor, decode_shape, report, roofline, total
from stages.trace import summarize_trace


# ============================================================================================ roofline
def test_a_phase_at_the_ridge_point_is_flop_bound() -> None:
    """compute == traffic (1e12 FLOPs at 1 TFLOP/s, 1e12 bytes at 1 TB/s: 1 s each) names the FLOPs."""
    assert roofline(1e12, 1e12, 1.0, 1.0) == Floor(1.0, 1e12, 1e12, "flops")
    # total of a 1 s FLOP floor and a 1 s bandwidth floor: 2 s, the tie also goes to "flops"
    assert total([Floor(1.0, 1.0, 0.0, "flops"), Floor(1.0, 0.0, 1.0, "bandwidth")]).bound == "flops"


def test_report_converts_to_tflop_and_decimal_gigabytes_and_divides_measured_by_floor() -> None:
    """3e12 FLOPs = 3 TFLOP, 5e9 bytes = 5 GB (10^9, not GiB: 4.657), gap = measured 4 s / floor 2 s = 2."""
    floors = {"generation": Floor(2.0, 3e12, 5e9, "bandwidth"), "scoring": Floor(0.0, 0.0, 0.0, "flops")}
    r = report(floors, {"generation": 4.0, "scoring": 1.0})
    assert r["generation"] == {"floor_s": 2.0, "bound": "bandwidth", "tflop": 3.0, "gbytes": 5.0, "gap": 2.0}
    assert r["scoring"]["gap"] is None  # a zero floor has no gap
    assert report(floors, {})["generation"]["gap"] is None  # nothing measured


def _llama_with_head_dim() -> LlamaForCausalLM:
    # hidden 16, 2 heads of head_dim 4 (not 16 // 2 = 8), 1 KV head, MLP 32, 1 layer, vocab 40, tied head
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                        tie_word_embeddings=True))


def test_an_explicit_head_dim_sets_the_attention_width_and_kv_bytes() -> None:
    """q 16x(2*4) + k 16x4 + v 16x4 + o (2*4)x16 = 128 + 64 + 64 + 128 = 384, MLP 3 x 16x32 = 1536: body 1920;
    width = 2 heads x 4 = 8; KV bytes per token = 1 layer x 2 (K, V) x 1 KV head x 4 x 4 bytes = 32."""
    model = _llama_with_head_dim()
    shape = flop_shape(model, lm_head=True)
    assert (shape.body, shape.head, shape.layers, shape.width) == (1920, 640, 1, 8)
    assert decode_shape(model).kv_bytes == 32


# ============================================================================================ perf
def test_flop_shape_counts_zero3_partitions_in_full() -> None:
    """Parameters emptied as ZeRO-3 leaves them (numel 0), their full shape in ds_shape: same count as whole."""
    whole = flop_shape(_llama_with_head_dim(), lm_head=True)
    model = _llama_with_head_dim()
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert flop_shape(model, lm_head=True) == whole


@pytest.mark.parametrize("name, bf16, fp32, bandwidth", [
    ("NVIDIA H200 NVL", 835.0, 60.0, 4.8),
    ("NVIDIA H200", 989.4, 67.0, 4.8),
    ("NVIDIA H100 NVL", 835.0, 60.0, 3.9),
    ("NVIDIA H100 PCIe", 756.0, 51.0, 2.0),
    ("NVIDIA L40S", 362.1, 91.6, 0.864),
    ("NVIDIA L40", 181.0, 90.5, 0.864),
    ("NVIDIA L4", 121.0, 30.3, 0.3),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5, 2.039),
    ("NVIDIA A100 80GB PCIe", 312.0, 19.5, 1.935),
    ("NVIDIA A100-SXM4-40GB", 312.0, 19.5, 1.555),
    ("NVIDIA GH200 480GB", 989.4, 67.0, 4.0),  # contains "H200": GH200 must be matched first
    ("NVIDIA GH200 144G HBM3e", 989.4, 67.0, 4.9),
])
def test_peak_tables_match_the_longest_name_first(name: str, bf16: float, fp32: float, bandwidth: float) -> None:
    """A name containing a shorter entry's fragment (H200 NVL / H200, L40S / L40, A100-SXM4-80GB / A100)
    gets its own row, in every table; fp16 reads the tensor-core table as bf16 does."""
    assert peak_tflops(name) == bf16 and peak_tflops(name, torch.float16) == bf16
    assert peak_tflops(name, torch.float32) == fp32
    assert peak_bandwidth_tbs(name) == bandwidth


def test_peak_memory_is_reported_in_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU: bytes / 2**30 (2**31 bytes = 2.0 GiB, not 2.147 GB). Linux ru_maxrss in KiB: 3 * 2**20 KiB = 3.0 GiB."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**31)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2**30)
    assert peak_memory_gib(torch.device("cuda", 0)) == {"perf/peak_gpu_allocated_gib": 2.0,
                                                         "perf/peak_gpu_reserved_gib": 3.0}
    monkeypatch.setattr(perf.sys, "platform", "linux")
    monkeypatch.setattr(perf.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**20))
    assert peak_memory_gib(torch.device("cpu")) == {"perf/peak_host_rss_gib": 3.0}


def test_count_calls_counts_cooperative_kernel_launches() -> None:
    assert count_calls(["cudaLaunchCooperativeKernel", "cudaLaunchCooperativeKernelMultiDevice"])[
        "kernel_launches"] == 2


def _event(name: str, start: float, end: float, device: str = "CPU") -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=getattr(torch.autograd.DeviceType, device),
                           time_range=SimpleNamespace(start=start, end=end))


def test_names_inside_uses_the_first_host_side_marker_range_only() -> None:
    """The marker's GPU copy [0, 100] (listed first) and a second host range [30, 40] are not the window: only
    the first host range [10, 20] is, so only "a" [12, 14] is inside ("b" is in the second, "c" in the GPU copy)."""
    m = perf.COUNTED_RANGE
    events = [_event(m, 0, 100, "CUDA"), _event(m, 10, 20), _event("a", 12, 14), _event(m, 30, 40),
              _event("b", 32, 33), _event("c", 50, 60)]
    assert names_inside(events) == ["a"]


def test_unwrap_reaches_the_hf_model_inside_an_engine_and_a_value_model() -> None:
    hf = torch.nn.Linear(1, 1)
    assert unwrap(SimpleNamespace(module=SimpleNamespace(seqcls=hf))) is hf  # engine -> ValueModel -> HF model
    assert unwrap(SimpleNamespace(seqcls=hf)) is hf and unwrap(hf) is hf


# ============================================================================================ trace
def test_a_host_call_at_either_end_of_a_range_belongs_to_it() -> None:
    """Range rlhf.a on the host over [0, 10] us; calls at t 0 and t 10 queue kernels of 5 us each: both are
    rlhf.a's (ranges are closed), none is "other"."""
    def x(cat: str, name: str, ts: float, dur: float, **args: int) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [x("user_annotation", "rlhf.a", 0, 10), x("cuda_runtime", "cudaLaunchKernel", 0, 1, correlation=1),
              x("cuda_runtime", "cudaLaunchKernel", 10, 1, correlation=2), x("kernel", "k", 20, 5, correlation=1),
              x("kernel", "k", 30, 5, correlation=2)]
    p = summarize_trace(events)["phases"]
    # span [20, 35] = 15 us, busy 10 of them
    assert p == {"rlhf.a": pytest.approx({"count": 1, "host_ms": 0.01, "gpu_ms": 0.01, "span_ms": 0.015,
                                          "busy": 10 / 15})}
