"""The PPO fast paths on a CUDA GPU (skipped without one): CUDA-graph decoding (torch.compile reduce-overhead
over the static KV cache) against the eager static and the dynamic reference, and chunked log-probs in bf16.
Tolerances: float32 decoding must draw identical samples; bf16 next-token log-probabilities of the two caches
differ by at most 0.05 nats (their attention kernels see different key lengths); chunked bf16 log-probs equal
the full-logits ones to 1e-5 (the same bf16 logits, upcast alike)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import cli_env, floor_within_rounding
from stages.config import GenerationConfig
from stages.perf import compile_counters, launch_counts
from stages.ppo.decode import DynamicDecoder, StaticDecoder, bucket_left_pad
from stages.ppo.rollout import left_pad, response_logprobs, sample
from stages.reward_model import positions_from_mask

pytestmark = [pytest.mark.gpu]

VOCAB, PAD_ID = 512, 0
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 12, 3, 7, 8, 9], [21, 4], [33, 8, 15]] * 4


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_ID)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def test_cuda_graph_decoding_draws_the_same_samples_as_eager_and_dynamic():
    model = _model(torch.float32)
    ids, mask = left_pad(PROMPTS, PAD_ID, torch.device("cuda"))
    out = {}
    for name, cache, compiled in (("dynamic", "dynamic", False), ("static", "static", False),
                                  ("graphs", "static", True)):
        gen = GenerationConfig(max_new_tokens=24, cache=cache, compile=compiled)
        for _ in range(2 if compiled else 1):  # the first compiled rollout records the graphs
            torch.manual_seed(7)
            out[name] = sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)
    for name in ("static", "graphs"):
        assert torch.equal(out[name].response, out["dynamic"].response), name
        assert torch.equal(out[name].response_mask, out["dynamic"].response_mask), name


def test_compiled_decoding_replays_one_cuda_graph_per_step_without_host_syncs():
    """What makes the compiled step fast, counted by torch.profiler on a third rollout (the first two warm up
    and record): no compiled graph ran without CUDA graphs, exactly one graph launch per decoding step and no
    new capture, and no host sync per step (a rollout's set-up has a few: the stop ids, the prefill's masks)."""
    model = _model(torch.bfloat16)
    ids, mask = left_pad(PROMPTS, PAD_ID, torch.device("cuda"))
    steps = 24
    gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, cache="static", compile=True)
    skips = compile_counters()["cudagraph_skips"]
    for _ in range(2):
        sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)
    counts = launch_counts(lambda: sample(model, ids, mask, gen, [1], PAD_ID, VOCAB), torch.device("cuda"))
    assert compile_counters()["cudagraph_skips"] == skips, "CUDA graphs skipped; TORCH_LOGS=cudagraphs tells why"
    assert counts is not None
    assert counts["graph_launches"] == steps - 1 and counts["graph_captures"] == 0, counts
    assert counts["host_syncs"] <= 8, counts  # one per step would be at least 23


def test_sampling_inside_the_cuda_graph_step_draws_the_eager_samples_with_one_launch_per_step():
    """generation.compile_sampling on the GPU, in float32 with top-k, top-p and the penalty: the same tokens as the
    eager static path from the same seed (the draw uses torch's own random kernels, graph-safe), and on a third
    rollout one CUDA-graph launch per decoding step, no capture, no compiled graph without CUDA graphs."""
    model = _model(torch.float32)
    ids, mask = left_pad(PROMPTS, PAD_ID, torch.device("cuda"))
    steps, settings = 24, dict(repetition_penalty=1.2, top_k=50, top_p=0.9, temperature=0.8)
    out, skips = {}, compile_counters()["cudagraph_skips"]
    for name, extra in (("eager", {}), ("fused", dict(compile=True, compile_sampling=True))):
        gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, cache="static", **settings, **extra)
        for _ in range(2):  # the second fused rollout replays what the first recorded
            torch.manual_seed(7)
            out[name] = sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)
    assert torch.equal(out["fused"].response, out["eager"].response)
    counts = launch_counts(lambda: sample(model, ids, mask, gen, [1], PAD_ID, VOCAB), torch.device("cuda"))
    assert compile_counters()["cudagraph_skips"] == skips, "CUDA graphs skipped; TORCH_LOGS=cudagraphs tells why"
    assert counts is not None
    assert counts["graph_launches"] == steps - 1 and counts["graph_captures"] == 0, counts
    assert counts["host_syncs"] <= 8, counts  # one per step would be at least 23
    # rows stopping at different steps, stop ids held back for the first 4 (two graphs): the same tokens
    stop = int(out["eager"].response[0, 6])  # a token the rows draw now and then
    for name, extra in (("eager", {}), ("fused", dict(compile=True, compile_sampling=True))):
        gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=4, cache="static", **settings, **extra)
        for _ in range(2):
            torch.manual_seed(11)
            out[name] = sample(model, ids, mask, gen, [stop], PAD_ID, VOCAB)
    assert torch.equal(out["fused"].response, out["eager"].response)
    assert torch.equal(out["fused"].response_mask, out["eager"].response_mask)
    assert compile_counters()["cudagraph_skips"] == skips


@torch.no_grad()
def test_compiled_top_p_floor_equals_the_sort_on_w1_sized_bf16_logits():
    """The top-p floor search as generation.compile runs it (inductor, Triton) against eager mode's sort on
    64 x 151,936 bf16 logits (W1's sampling shape), flat and peaked: each is the float64 floor up to 1e-5 of mass
    (`floor_within_rounding`: the GPU's float32 cumsum drifts ~1e-6 over the row, which can put the floor on
    the other side of a group of tied tokens holding ~5e-5), and are timed here for the record."""
    from stages.ppo.rollout import nucleus_floor, nucleus_floor_sorted

    g = torch.Generator("cuda").manual_seed(0)
    for scale in (1.0, 4.0):
        z = (torch.randn(64, 151936, device="cuda", generator=g) * scale).to(torch.bfloat16)
        probs = torch.softmax(z.float() / 0.8, -1)
        a, b = nucleus_floor_sorted(probs, 0.9), nucleus_floor(probs, 0.9, compiled=True)
        assert floor_within_rounding(probs, a, 0.9).all() and floor_within_rounding(probs, b, 0.9).all(), scale
    times = {}
    for name, fn in (("sorted", lambda: nucleus_floor_sorted(probs, 0.9)),
                     ("searched", lambda: nucleus_floor(probs, 0.9, compiled=True))):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / 20
    print(f"top-p floor per step, 64 x 151936: sorted {times['sorted']:.3f} ms, searched {times['searched']:.3f} ms")


def test_bf16_static_and_dynamic_next_token_distributions_agree():
    model = _model(torch.bfloat16)
    ids, mask = left_pad(PROMPTS, PAD_ID, torch.device("cuda"))
    padded_ids, padded_mask = bucket_left_pad(ids, mask, PAD_ID)
    dyn, sta = DynamicDecoder(model, mask), StaticDecoder(model, padded_mask, 16, compile_step=False)
    a = dyn.prefill(ids, positions_from_mask(mask))
    b = sta.prefill(padded_ids, positions_from_mask(padded_mask))
    nxt = positions_from_mask(mask)[:, -1] + 1
    alive = torch.ones(len(PROMPTS), dtype=torch.bool, device="cuda")
    worst = 0.0
    for step in range(16):
        la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
        worst = max(worst, float((la - lb).abs().max()))
        tok = la.argmax(-1)
        a, b = dyn.step(tok, alive, nxt), sta.step(tok, alive, nxt)
        nxt = nxt + 1
    assert worst <= 0.05


def test_bf16_chunked_logprobs_equal_full_logits_on_gpu():
    model = _model(torch.bfloat16)
    ids, mask = left_pad(PROMPTS, PAD_ID, torch.device("cuda"))
    resp = torch.randint(2, VOCAB, (len(PROMPTS), 20), device="cuda")
    full_ids, full_mask = torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1)
    with torch.no_grad():
        ref, ref_ent = response_logprobs(model, full_ids, full_mask, ids.shape[1], resp, True, chunk_tokens=0)
        fast, fast_ent = response_logprobs(model, full_ids, full_mask, ids.shape[1], resp, True, chunk_tokens=64)
    # cuBLAS picks its GEMM kernel by shape (324 rows at once vs 60-row chunks), so a bf16 logit may round the
    # other way: up to one bf16 step of a logit (2^-8 relative) per token, hence a worst case of 0.05 nats and
    # a mean far below it (bit-equal on the CPU: test_fastpath.py)
    for a, b in ((ref, fast), (ref_ent, fast_ent)):
        diff = (a - b).abs()
        print(f"bf16 chunked vs full: worst {float(diff.max()):.2e}, mean {float(diff.mean()):.2e}")
        assert float(diff.max()) <= 0.05 and float(diff.mean()) <= 2e-3


def test_cuda_graphs_follow_the_policy_through_optimizer_steps_without_recompiling():
    """As in rlhf ppo: sample from a DeepSpeed engine's module (training mode), take an optimizer step, sample
    again. The recorded CUDA graphs must read the updated weights (the same samples as eager decoding of the
    same weights, float32) and the step must never recompile; a bf16 engine's optimizer must update the weights
    in place (the graphs read fixed addresses). In its own process: the test session runs DeepSpeed on its CPU
    accelerator (conftest), which would move the engine's module off the GPU; the child is told cuda
    explicitly, since importing conftest there (this file does) would set cpu again where the variable is unset."""
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   "DS_ACCELERATOR": "cuda"})
    res = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "engine check: ok" in res.stdout


def _engine_check() -> None:
    from stages import engine as engines
    from stages.config import DeepSpeedConfig, TrainConfig
    from stages.distributed import setup_distributed

    dist = setup_distributed()
    assert dist.device.type == "cuda", dist.device
    ids, mask = left_pad(PROMPTS, PAD_ID, dist.device)
    train = TrainConfig(micro_batch_size=len(PROMPTS), lr=1e-2)
    # bf16: DeepSpeed's optimizer writes the new weights into the same storage
    bf16 = engines.initialize_engine(_model(torch.bfloat16).train(), engines.build_deepspeed_config(
        train, DeepSpeedConfig(precision="bf16"), 1, True), train, 10)
    ptrs = [p.data_ptr() for p in bf16.module.parameters()]
    before = [p.detach().clone() for p in bf16.module.parameters()]
    for _ in range(2):
        seq = torch.cat([ids, ids], 1)
        bf16.backward(bf16(input_ids=seq, labels=seq).loss)
        bf16.step()
    assert [p.data_ptr() for p in bf16.module.parameters()] == ptrs
    assert any(not torch.equal(a, b) for a, b in zip(before, bf16.module.parameters()))
    # float32: graphs against eager decoding of the same, updated weights
    engine = engines.initialize_engine(_model(torch.float32).train(), engines.build_deepspeed_config(
        train, DeepSpeedConfig(precision="fp32"), 1, True), train, 10)
    graphs = GenerationConfig(max_new_tokens=24, cache="static", compile=True)
    eager = graphs.model_copy(update={"compile": False})
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            got = {}
            for name, gen in (("graphs", graphs), ("eager", eager), ("graphs-again", graphs)):
                torch.manual_seed(3)
                got[name] = sample(engine.module, ids, mask, gen, [1], PAD_ID, VOCAB)
            for name in ("graphs", "graphs-again"):
                assert torch.equal(got[name].response, got["eager"].response), name
            seq, seq_mask = got["eager"].sequences()
            engine.backward(engine(input_ids=seq, attention_mask=seq_mask, labels=seq).loss)
            engine.step()
    assert engine.global_steps == 3
    print("engine check: ok")


if __name__ == "__main__":
    _engine_check()


def test_gpu_memory_default_is_the_gpu_torch_sees_and_an_out_of_memory_rank_reports_its_own():
    """(Here rather than in test_gpu.py: gpu_bench.sh's tests part runs this file.) --gpu-memory's default,
    nvidia-smi's memory.total of the first GPU, is the GPU torch uses, torch's total within the few percent the
    driver keeps; a rank out of memory that used CUDA fits the estimate to its own GPU's total."""
    from conftest import TINY_SFT
    from rlhf_cli.config_loader import load_config
    from rlhf_cli.gpu_memory import out_of_memory_message
    from rlhf_cli.launcher import gpu_memory

    torch.zeros(1, device="cuda")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    smi = gpu_memory(1)
    assert smi is not None and 0.95 * smi <= total <= 1.001 * smi, (smi, total)
    cfg = load_config("sft", TINY_SFT, ["output_dir=/tmp/rlhf-gpu-oom-message"])
    said = out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory."), cfg, None)
    assert f"GPU memory: {total / 2**30:.3f} GiB per GPU (this rank's GPU)" in said and "fits" in said, said
