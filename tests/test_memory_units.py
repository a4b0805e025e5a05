"""The `--dry-run` memory estimate (stages/memory.py) piece by piece, against hand-computed values: the DeepSpeed
settings it reads, the trained-model parts the census test in test_bench.py does not reach (ZeRO-1 offload, fp32
ZeRO-2, ZeRO-3 without contiguous gradients, large models' all-reduce buckets, ZeRO-2's float32 reduce with a tied
embedding and parameters larger than a bucket, compute_grad_norm), activations and logits of every branch,
the architecture read from a config, the PPO / SFT / RM components and the printed table. No model is trained."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import REPO
from stages.config import DeepSpeedConfig
from stages.memory import (GIB, Phase, Shape, ZeroTuning, activations, format_estimate, logit_bytes, trained_model,
                           zero_tuning)

TINY = REPO / "configs" / "tiny"
F32_ACCUM = {"data_types": {"grad_accum_dtype": "fp32"}}
_ZERO12 = ["fp32 gradients", "flattened 16-bit gradients"]
_NORM12, _NORM = {"fp64 norm copy": 8 * 300}, ["fp64 norm copy"]  # the largest parameter (300) in float64


# --------------------------------------------------------------------------------------------- DeepSpeed settings
def test_zero_tuning_keeps_deepspeeds_defaults_for_keys_not_set():
    """No raw config: reduce bucket 5e8, prefetch 5e7, sub-group 1e9 elements, contiguous gradients, overlap_comm
    and the accumulation dtype left to DeepSpeed (None)."""
    assert zero_tuning(DeepSpeedConfig()) == ZeroTuning(500_000_000, 50_000_000, 1_000_000_000, True, None, None)
    assert zero_tuning(DeepSpeedConfig(config={"zero_optimization": {}})).reduce_bucket == 500_000_000


def test_zero_tuning_reads_each_key_of_the_raw_config():
    """Every memory-moving key, spelled as a DeepSpeed JSON may (numbers as strings, 'false'), is read."""
    raw = {"zero_optimization": {"reduce_bucket_size": "2e3", "stage3_prefetch_bucket_size": 300,
                                 "sub_group_size": 40, "contiguous_gradients": "false", "overlap_comm": "true"},
           **F32_ACCUM}
    assert zero_tuning(DeepSpeedConfig(zero_stage=3, config=raw)) == ZeroTuning(2000, 300, 40, False, True, 4)
    assert not zero_tuning(DeepSpeedConfig(config={"zero_optimization": {"compute_grad_norm": "false"}})).grad_norm
    half = {"data_types": {"grad_accum_dtype": "bf16"}, "zero_optimization": {"overlap_comm": False}}
    assert zero_tuning(DeepSpeedConfig(zero_stage=1, precision="fp32", config=half)).accum_bytes == 2
    assert zero_tuning(DeepSpeedConfig(zero_stage=1, precision="fp32", config=half)).overlap_comm is False


# --------------------------------------------------------------------------------------------- trained model
def _trained(**ds: Any) -> tuple[dict[str, float], Phase]:
    """N = 1000 parameters (the largest 300) on W = 2 ranks, bf16 unless said, reduce buckets of 100 elements
    (the set-up of test_bench.py's hand table)."""
    raw = {"zero_optimization": {"reduce_bucket_size": 100, **ds.pop("zero", {})}, **ds.pop("config", {})}
    cfg = DeepSpeedConfig(**{"precision": "bf16", **ds, "config": raw})
    return trained_model(1000, cfg, world=2, largest=300, tuning=zero_tuning(cfg))


@pytest.mark.parametrize("ds, expected, gradients, moments", [
    # ZeRO-1 with offload_optimizer and float32 accumulation is no BF16_Optimizer: whole-model float32
    # gradients (4 N), a float32 bucket, the 16-bit staging buffer of the largest parameter (2 x 300), no step copy
    (dict(zero_stage=1, offload_optimizer=True, config=F32_ACCUM),
     {"weights": 2000, "optimizer": 0, "gradients": 4000, "reduce bucket": 400, "offload staging buffer": 600,
      **_NORM12}, ["gradients"], {"backward": ["reduce bucket", *_NORM]}),
    # ZeRO-2 with offload keeps its reduce bucket even without contiguous gradients
    (dict(zero_stage=2, offload_optimizer=True, zero={"contiguous_gradients": False}),
     {"weights": 2000, "optimizer": 0, "gradients": 0, "reduce bucket": 200, "offload staging buffer": 600,
      **_NORM12}, ["gradients"], {"backward": ["reduce bucket", *_NORM]}),
    # ZeRO-1 without contiguous gradients: no bucket and no gradient partition at the end of the backward pass;
    # the step's copies are 4 x 1000 / 2 and 2 x 1000 / 2
    (dict(zero_stage=1, zero={"contiguous_gradients": False}),
     {"weights": 2000, "optimizer": 6000, "gradients": 2000, "fp32 gradients": 2000,
      "flattened 16-bit gradients": 1000, **_NORM12},
     ["gradients"], {"step": _ZERO12, "norm": _NORM}),
    # fp32 ZeRO-2: the partition (4 x 1000 / 2) is float32 and is still flattened for the step: one float32 copy
    (dict(zero_stage=2, precision="fp32"),
     {"weights": 4000, "optimizer": 6000, "gradients": 2000, "reduce bucket": 400, "fp32 gradients": 2000,
      **_NORM12}, ["gradients"], {"backward": ["reduce bucket"], "step": ["fp32 gradients"], "norm": _NORM}),
    # ZeRO-3 without contiguous gradients: no bucket
    (dict(zero_stage=3, zero={"contiguous_gradients": False}),
     {"weights": 1000, "optimizer": 6000, "gradients": 1000, "ZeRO-3 gathered parameters": 2600,
      "fp32 gradients": 2000, "flattened 16-bit gradients": 1000, "fp64 norm copy": 8 * 300 / 2}, [],
     {"step": _ZERO12, "norm": _NORM}),
])
def test_trained_model_parts_beyond_the_census(ds, expected, gradients, moments):
    got, phase = _trained(**ds)
    assert got == expected
    assert (phase.gradients, phase.moments) == (gradients, moments)


#: N = 1000 in 7 parameters, the largest (300) the tied embedding
SIZES = (300, 250, 150, 100, 100, 50, 50)


def _float32_reduce(bucket: int, **zero: Any) -> tuple[dict[str, float], Phase]:
    """bf16 ZeRO-2 accumulating in float32 on W = 2 ranks (`_trained`'s set-up), `SIZES`, buckets of `bucket`."""
    cfg = DeepSpeedConfig(zero_stage=2, precision="bf16",
                          config={"zero_optimization": {"reduce_bucket_size": bucket, **zero}, **F32_ACCUM})
    return trained_model(1000, cfg, world=2, largest=300, tuning=zero_tuning(cfg), sizes=SIZES, tied=300)


def test_zero2_float32_reduce_a_tied_embedding_within_a_bucket():
    """Buckets of 500: no parameter is larger, none kept. A bucket fills inside the backward pass (N > 500) as a
    gradient of min(300, 500) arrives, while autograd holds the tied embedding's first gradient: 2 x 300 + 2 x 300;
    the bucket is reduced flattened (2 x 500) and cast slice by slice (4 x 300). At the end of the pass the
    embedding's two gradients and their sum: 3 x 2 x 300, beside the bucket (2 x 500)."""
    parts, phase = _float32_reduce(500)
    assert {k: parts[k] for k in ("reduce bucket", "bucket reduce copies", "gradients in flight",
                                  "tied embedding gradients")} == {
        "reduce bucket": 2 * 500, "bucket reduce copies": 2 * 500 + 4 * 300, "gradients in flight": 2 * 300 + 2 * 300,
        "tied embedding gradients": 3 * 2 * 300}
    assert "kept 16-bit gradients" not in parts
    assert phase.moments["backward"] == ["reduce bucket", "bucket reduce copies", "gradients in flight"]
    assert phase.moments["end of backward"] == ["reduce bucket", "tied embedding gradients"]


def test_zero2_float32_reduce_keeps_the_gradients_of_parameters_larger_than_a_bucket():
    """Buckets of 100: the parameters of 300 (the tied embedding), 250 and 150 elements are larger, their bf16
    gradients kept to the end of the pass: 2 x (300 + 250 + 150). The kept ones count the embedding's summed
    gradient, so at the end only its two own gradients come on top (2 x 2 x 300), and in the pass the arriving
    gradient is min(300, 100) without the embedding's (one or the other: 2 x 100). Copies: 2 x 100 + 4 x 100."""
    parts, phase = _float32_reduce(100)
    assert {k: parts[k] for k in ("reduce bucket", "kept 16-bit gradients", "bucket reduce copies",
                                  "gradients in flight", "tied embedding gradients")} == {
        "reduce bucket": 2 * 100, "kept 16-bit gradients": 2 * (300 + 250 + 150),
        "bucket reduce copies": 2 * 100 + 4 * 100, "gradients in flight": 2 * 100,
        "tied embedding gradients": 2 * 2 * 300}
    assert phase.moments["backward"] == ["reduce bucket", "kept 16-bit gradients", "bucket reduce copies",
                                         "gradients in flight"]
    assert phase.moments["end of backward"] == ["reduce bucket", "kept 16-bit gradients", "tied embedding gradients"]
    # the update's peak: the float32 partition (4 x 1000 / 2) + the end of the pass, 200 + 1400 + 1200, above the
    # pass (200 + 1400 + 600 + 200) and the norm's float64 copy of the largest parameter (8 x 300)
    from stages.memory import peak
    held = 2 * 1000 + 12 * 1000 / 2  # weights, optimizer
    assert peak(parts, {"m": phase}) == held + 4 * 1000 / 2 + 200 + 1400 + 1200


def test_zero2_float32_reduce_without_contiguous_gradients_keeps_every_gradient_of_a_rank():
    """No contiguous gradients: no bucket, and every bf16 gradient of a rank's is kept to the end of the pass,
    2 x 1000 / 2, which counts the embedding's sum (2 x 2 x 300 on top at the end); the arriving gradient
    2 x min(300, 100); the copies as with a bucket, 2 x 100 + 4 x 100. Without sizes only the largest parameter
    is known to be larger than a bucket (2 x 300 kept); without a tied embedding no moment of the pass's end."""
    parts, phase = _float32_reduce(100, contiguous_gradients=False)
    assert "reduce bucket" not in parts
    assert (parts["kept 16-bit gradients"], parts["tied embedding gradients"]) == (2 * 1000 / 2, 2 * 2 * 300)
    assert (parts["gradients in flight"], parts["bucket reduce copies"]) == (2 * 100, 2 * 100 + 4 * 100)
    assert phase.moments["end of backward"] == ["kept 16-bit gradients", "tied embedding gradients"]
    parts, phase = _trained(zero_stage=2, config=F32_ACCUM)
    assert parts["kept 16-bit gradients"] == 2 * 300 and "end of backward" not in phase.moments


def test_compute_grad_norm_false_drops_the_zero12_norm_copy():
    """zero_optimization.compute_grad_norm: false: ZeRO-1/2 take no gradient norm, no float64 copy (8 x 300) and no
    norm moment; DeepSpeed refuses it with optimizer offload, whose norm is kept."""
    for stage in (1, 2):
        parts, phase = _trained(zero_stage=stage, zero={"compute_grad_norm": False})
        assert "fp64 norm copy" not in parts and "norm" not in phase.moments, stage
        assert _trained(zero_stage=stage)[0]["fp64 norm copy"] == 8 * 300
    offloaded, _ = _trained(zero_stage=2, offload_optimizer=True, zero={"compute_grad_norm": False})
    assert offloaded["fp64 norm copy"] == 8 * 300


def test_the_norms_float64_copy_is_a_ranks_share_of_the_largest_parameter_at_most():
    """8 bytes x min(largest, N / W) at ZeRO-1/2 (a parameter larger than a rank's partition is cut by it), 8 x
    largest / W at ZeRO-3, and at most 2.5e8 elements at a time with ZeRO-3's optimizer offload."""
    for stage, world, expected in ((2, 4, 8 * 250), (1, 4, 8 * 250), (2, 2, 8 * 300), (3, 4, 8 * 300 / 4)):
        parts, _ = trained_model(1000, DeepSpeedConfig(zero_stage=stage), world=world, largest=300)
        assert parts["fp64 norm copy"] == expected, (stage, world)
    offloaded = DeepSpeedConfig(zero_stage=3, offload_optimizer=True)
    assert trained_model(10**10, offloaded, world=2, largest=10**9)[0]["fp64 norm copy"] == 8 * 2.5e8


def test_the_zero0_all_reduce_bucket_of_a_large_model_is_500m_elements_plus_the_largest_parameter():
    """N = 1e9 parameters, the largest 1e8: the engine flattens min(N, 5e8 + 1e8) = 6e8 elements at a time, in
    the training precision (2 bytes: 1.2e9) or, under BF16_Optimizer, float32 + bf16 (6 bytes: 3.6e9); a model
    smaller than the bucket all-reduces N elements at once (2 x 3e8)."""
    def buffer(n: int, **ds: Any) -> float:
        cfg = DeepSpeedConfig(**{"precision": "bf16", **ds})
        return trained_model(n, cfg, world=2, largest=100_000_000, tuning=zero_tuning(cfg))[0]["all-reduce buffer"]

    assert buffer(1_000_000_000, zero_stage=0) == 2 * 600_000_000
    assert buffer(1_000_000_000, zero_stage=1, config=F32_ACCUM) == 6 * 600_000_000
    assert buffer(300_000_000, zero_stage=0) == 2 * 300_000_000


def test_the_default_reduce_bucket_is_deepspeeds_5e8_elements():
    """ZeRO-2 bf16 with no raw config: one bucket of 5e8 bf16 elements (1e9 bytes, the docstring's 0.93 GiB)."""
    cfg = DeepSpeedConfig(zero_stage=2, precision="bf16")
    parts, _ = trained_model(1000, cfg, world=2, largest=300, tuning=zero_tuning(cfg))
    assert parts["reduce bucket"] == 2 * 500_000_000


# --------------------------------------------------------------------------------------------- activations, logits
#: a GPT-like (ungated) and a Llama-like (gated) shape: 3 layers, H = 8, I = 16, K = 4, V = 50
UNGATED = Shape(0, 3, 8, 50, 4, 16, gated=False)
GATED = Shape(0, 3, 8, 50, 4, 16, gated=True)


def test_activations_of_each_branch_by_hand():
    """2 rows x 5 tokens: ungated 34 H = 272 bytes per token per layer at 2 bytes; gated 20 H + 8 I + 4 K =
    160 + 128 + 16 = 304; fp32 doubles them; checkpointing keeps each layer's input (b x 10 x 8 per layer) plus
    one layer in full. A padded batch under sdpa: each layer's mask as a bias, b x 2 rows x 5^2 more per layer."""
    assert activations(UNGATED, 2, 5, "bf16", False) == 272 * 10 * 3  # 8160
    assert activations(GATED, 2, 5, "bf16", False) == 304 * 10 * 3  # 9120
    assert activations(GATED, 2, 5, "fp32", False) == 304 * 10 * 2 * 3  # 18240
    assert activations(GATED, 2, 5, "bf16", True) == 2 * 10 * 8 * 3 + 304 * 10  # 480 + 3040
    assert activations(UNGATED, 2, 5, "fp32", True) == 4 * 10 * 8 * 3 + 272 * 10 * 2  # 960 + 5440
    assert activations(GATED, 2, 5, "bf16", False, masked=True) == 304 * 10 * 3 + 2 * 2 * 25 * 3  # 9120 + 300
    assert activations(GATED, 2, 5, "fp32", True, masked=True) == 4 * 10 * 8 * 3 + 304 * 10 * 2 + 4 * 2 * 25  # 7240


def test_logit_bytes_of_each_branch_by_hand():
    """V = 50, 3 scored positions per row. Chunked: one block of min(chunk, rows x 3) rows, 16 bytes per element
    (28 with the entropy). Full logits: the logits and their gradient (2 b rows 3 V) plus one float32 block of
    min(8, rows) rows (16 bytes per element, 24 with the entropy)."""
    assert logit_bytes(GATED, 2, 3, "bf16", 100) == 6 * 50 * 16  # the chunk exceeds the 6 positions
    assert logit_bytes(GATED, 2, 3, "bf16", 100, entropy=True) == 6 * 50 * 28
    assert logit_bytes(GATED, 2, 3, "bf16", 4) == 4 * 50 * 16
    assert logit_bytes(GATED, 10, 3, "bf16", 0) == 2 * 2 * 10 * 3 * 50 + 8 * 3 * 50 * 16  # 6000 + 19200
    assert logit_bytes(GATED, 10, 3, "fp32", 0, entropy=True) == 2 * 4 * 10 * 3 * 50 + 8 * 3 * 50 * 24
    assert logit_bytes(GATED, 2, 3, "bf16", 0) == 2 * 2 * 2 * 3 * 50 + 2 * 3 * 50 * 16  # 1200 + 4800


# --------------------------------------------------------------------------------------------- architecture
def test_model_shape_reads_every_field_of_a_gated_gqa_and_a_gpt2_architecture():
    """Llama (H 32, I 64, 2 layers, 4 heads of 8, 2 kv heads) with a 100-word vocabulary: K = 2 x 8 = 16, gated,
    the largest parameter the 100 x 32 embedding, untied (Llama's default): its own output layer, no tied
    embedding; with tie_word_embeddings one 100 x 32 parameter fewer, and it is the tied one. GPT-2 (n_embd 16,
    one layer, 2 heads, 32 positions, 50 words): no n_inner, so I = 4 x 16; K = 2 heads x 8 (no kv heads of its
    own); not gated; the largest parameter the MLP's 16 x 64 c_fc (above wte 50 x 16, c_attn 16 x 48, wpe 32 x 16);
    wte tied (GPT-2's default). Every parameter's size, largest first."""
    from stages.config import ModelConfig
    from stages.memory import model_shape

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32  # q, o, k, v, MLP, norms
    layers = (32 * 64,) * 6 + (32 * 32,) * 4 + (32 * 16,) * 4 + (32,) * 4
    assert model_shape(ModelConfig(from_config=llama), vocab_hint=100) == Shape(
        2 * 100 * 32 + 2 * per_layer + 32, 2, 32, 100, 16, 64, True, 100 * 32, 0, (100 * 32,) * 2 + layers + (32,))
    tied = model_shape(ModelConfig(from_config={**llama, "tie_word_embeddings": True}), vocab_hint=100)
    assert tied is not None and (tied.params, tied.tied) == (100 * 32 + 2 * per_layer + 32, 100 * 32)
    assert tied.sizes == (100 * 32,) + layers + (32,)
    gpt2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32}
    shape = model_shape(ModelConfig(from_config=gpt2), vocab_hint=50)
    assert shape is not None and shape[1:8] == (1, 16, 50, 16, 64, False, 16 * 64)
    assert shape.tied == 50 * 16
    # c_fc, c_proj; wte, c_attn, wpe; attn c_proj; c_fc bias, c_attn bias; 2 x 3 layer norms' and 2 biases
    assert shape.sizes == (16 * 64, 64 * 16, 50 * 16, 16 * 48, 32 * 16, 16 * 16, 64, 48) + (16,) * 8


# --------------------------------------------------------------------------------------------- stage estimates
#: the shapes the patched `model_shape` returns, by name_or_path
POLICY = Shape(1000, 2, 8, 50, 4, 16, gated=True, largest=300)  # 304 activation bytes per token per layer
CRITIC = Shape(600, 1, 4, 50, 4, 0, gated=False, largest=200)  # 34 x 4 = 136


@pytest.fixture
def shapes(monkeypatch) -> None:
    from stages import memory

    monkeypatch.setattr(memory, "model_shape", lambda cfg, hint=None: {"policy": POLICY, "critic": CRITIC,
                                                                       "sft": POLICY}[cfg.name_or_path])
    monkeypatch.setattr(memory, "tokenizer_vocab", lambda cfg: None)


def _ppo(tmp_path, *sets: str) -> Any:
    from rlhf_cli.config_loader import load_config

    return load_config("ppo", TINY / "ppo.yaml", [
        f"output_dir={tmp_path}", "model.name_or_path=policy", "reward_model.name_or_path=critic",
        "data.max_prompt_length=6", "generation.max_new_tokens=4", "train.rollout_batch_size=4",
        "train.mini_batch_size=4", "train.micro_batch_size=2", "deepspeed.precision=bf16", *sets])


def test_ppo_estimate_components_by_hand(tmp_path, shapes):
    """bf16, ZeRO-0 on 2 ranks, micro-batches of 2 rows of 6 + 4 = 10 tokens, 4 prompts per rollout:
    frozen reference 2 x 1000 and reward model 2 x 600 (whole per rank); KV cache 2 x 2 layers x K 4 x 10 tokens
    x 4 prompts x 2 bytes; the policy's activations 304 x 20 tokens x 2 layers, the critic's 136 x 20 x 1 layer,
    each layer with its mask as a bf16 bias of 2 rows x 10^2 (rollouts count as padded; with eager attention
    no mask is counted); logits: one chunk of min(3, 2 rows x 4 responses) = 3 rows x V
    50, 28 bytes each with the entropy. With critic_init: policy the critic has the policy's shape."""
    from stages.memory import estimate

    est = estimate(_ppo(tmp_path, "deepspeed.zero_stage=0", "train.logprob_chunk=3", "ppo.entropy_coef=0.01"), 2)
    parts = est["parts"]
    assert parts["reference weights"] == 2000 and parts["reward model weights"] == 1200
    assert "sampling copy of the policy" not in parts
    assert parts["KV cache (rollout)"] == 2 * 2 * 4 * 10 * 4 * 2  # 640
    assert parts["activations (policy micro-batch)"] == 304 * 20 * 2 + 2 * 2 * 100 * 2  # 12160 + 800
    assert parts["activations (critic micro-batch)"] == 136 * 20 * 1 + 2 * 2 * 100 * 1  # 2720 + 400
    assert parts["logits (policy micro-batch)"] == 3 * 50 * 28  # 4200
    assert parts["policy weights"] == 2000 and parts["critic weights"] == 1200
    assert est["phases"]["policy"].moments["backward"][-2:] == ["activations (policy micro-batch)",
                                                                 "logits (policy micro-batch)"]
    assert est["phases"]["critic"].moments["backward"][-1] == "activations (critic micro-batch)"
    no_entropy = estimate(_ppo(tmp_path, "deepspeed.zero_stage=0", "train.logprob_chunk=3"), 2)
    assert no_entropy["parts"]["logits (policy micro-batch)"] == 3 * 50 * 16
    eager = estimate(_ppo(tmp_path, "deepspeed.zero_stage=0", "model.attn_implementation=eager",
                          "reward_model.attn_implementation=eager"), 2)["parts"]
    assert (eager["activations (policy micro-batch)"], eager["activations (critic micro-batch)"]) == (12160, 2720)
    parts = estimate(_ppo(tmp_path, "deepspeed.zero_stage=0", "ppo.critic_init=policy"), 2)["parts"]
    assert parts["critic weights"] == parts["policy weights"] == 2000
    assert parts["activations (critic micro-batch)"] == parts["activations (policy micro-batch)"] == 12960


def test_ppo_estimate_adds_the_ptx_loss_to_the_policys_backward_pass(tmp_path, shapes):
    """With ptx_coef > 0 each policy micro-batch's loss also holds the LM loss of 2 PTX rows of ptx_max_length
    12 tokens: activations 304 x 24 x 2 layers, logits as SFT's (3 x 2 bytes x 24 x 50 plus one float32 block of
    24 rows x 50 x 12), both in the policy's backward moment and so in the peak. data.ptx with ptx_coef 0 is
    not read: nothing added."""
    from stages.memory import estimate

    ptx = [f"data.ptx={TINY / 'data' / 'sft.jsonl'}", "data.ptx_max_length=12", "deepspeed.zero_stage=0"]
    plain = estimate(_ppo(tmp_path, *ptx), 1)
    assert not [k for k in plain["parts"] if "PTX" in k]
    est = estimate(_ppo(tmp_path, *ptx, "ppo.ptx_coef=0.5"), 1)
    assert est["parts"]["activations (PTX micro-batch)"] == 304 * 24 * 2 + 2 * 2 * 144 * 2  # 14592 + 1152
    assert est["parts"]["logits (PTX micro-batch)"] == 3 * 2 * 24 * 50 + 24 * 50 * 12  # 7200 + 14400
    assert est["phases"]["policy"].moments["backward"][-2:] == ["activations (PTX micro-batch)",
                                                                 "logits (PTX micro-batch)"]
    assert est["total"] - plain["total"] == 15744 + 21600


def test_ppo_estimate_frozen_models_and_sampling_copy_follow_their_own_stages(tmp_path, shapes):
    """ZeRO-3 on 2 ranks: the sampling copy is the whole policy (2 x 1000); the frozen models are partitioned
    (/ 2) by default, whole with frozen_zero_stage 0. ZeRO-2 has no sampling copy."""
    from stages.memory import estimate

    parts = estimate(_ppo(tmp_path, "deepspeed.zero_stage=3"), 2)["parts"]
    assert (parts["reference weights"], parts["reward model weights"]) == (1000, 600)
    assert parts["sampling copy of the policy"] == 2000
    parts = estimate(_ppo(tmp_path, "deepspeed.zero_stage=3", "deepspeed.frozen_zero_stage=0"), 2)["parts"]
    assert (parts["reference weights"], parts["reward model weights"]) == (2000, 1200)
    # loaded in float32 in a bf16 run: the reference as the policy computes (2 x 1000), a plain reward model as
    # loaded (4 x 600), a ZeRO-3 one cast by its engine (2 x 600 / 2); an fp32 run keeps model.dtype bfloat16
    wide = ["deepspeed.zero_stage=3", "model.dtype=float32", "reward_model.dtype=float32"]
    parts = estimate(_ppo(tmp_path, *wide, "deepspeed.frozen_zero_stage=0"), 2)["parts"]
    assert (parts["reference weights"], parts["reward model weights"]) == (2000, 2400)
    parts = estimate(_ppo(tmp_path, *wide), 2)["parts"]
    assert (parts["reference weights"], parts["reward model weights"]) == (1000, 600)
    parts = estimate(_ppo(tmp_path, "deepspeed.precision=fp32", "model.dtype=bfloat16",
                          "deepspeed.frozen_zero_stage=0"), 1)["parts"]
    assert (parts["reference weights"], parts["reward model weights"]) == (2000, 4 * 600)
    assert "sampling copy of the policy" not in estimate(_ppo(tmp_path, "deepspeed.zero_stage=2"), 2)["parts"]


def _lm(stage: str, tmp_path, *sets: str) -> Any:
    from rlhf_cli.config_loader import load_config

    return load_config(stage, TINY / ("sft.yaml" if stage == "sft" else "rm.yaml"), [
        f"output_dir={tmp_path}", "model.from_config=null", "model.name_or_path=sft", "data.max_length=10",
        "train.micro_batch_size=2",
        "deepspeed.precision=bf16", *sets])


def test_sft_and_rm_estimates_logits_and_activations_by_hand(tmp_path, shapes):
    """2 rows of 10 tokens, V 50, bf16. SFT: activations 304 x 20 x 2 layers plus each layer's mask (a bf16 bias of
    2 rows x 10^2 under sdpa; none with eager attention, not modelled); logits 3 x 2 bytes x 20 x 50 plus
    one float32 cross-entropy block of min(4096, 20) rows x 50 x 12 bytes. RM: chosen + rejected = 4 rows
    (304 x 40 x 2 + 2 x 4 x 100 x 2); no LM loss, no logits; with lm_coef one block over the chosen rows' positions only (the
    rejected rows train no LM loss): min(4096, 2 x 10) rows x 50 x 12."""
    from stages.memory import estimate

    sft = estimate(_lm("sft", tmp_path), 1)["parts"]
    assert sft["activations (micro-batch)"] == 304 * 20 * 2 + 2 * 2 * 100 * 2  # 12160 + 800
    eager = estimate(_lm("sft", tmp_path, "model.attn_implementation=eager"), 1)["parts"]
    assert eager["activations (micro-batch)"] == 12160
    assert sft["logits"] == 3 * 2 * 20 * 50 + 20 * 50 * 12  # 6000 + 12000
    rm = estimate(_lm("train-rm", tmp_path), 1)
    assert rm["parts"]["activations (micro-batch)"] == 304 * 40 * 2 + 2 * 4 * 100 * 2  # 24320 + 1600
    assert "logits" not in rm["parts"] and rm["phases"]["model"].moments["backward"][-1] == "activations (micro-batch)"
    lm = estimate(_lm("train-rm", tmp_path, "loss.lm_coef=0.5"), 1)
    assert lm["parts"]["logits"] == 20 * 50 * 12  # 12000
    assert lm["phases"]["model"].moments["backward"][-1] == "logits"


def test_a_tied_embedding_counts_for_the_policy_and_sft_and_for_an_rm_only_with_its_lm_loss(tmp_path, monkeypatch):
    """bf16 ZeRO-2 accumulating in float32 on one rank (buckets of 5e8, larger than the model): a tied embedding of
    300 elements adds its two gradients and their sum, 3 x 2 x 300, at the end of the backward pass: the policy's
    and SFT's; the critic's and a reward model's value head replaces the output layer (their shapes say tied, and
    it is not counted), unless the reward model's LM loss (lm_coef) uses the embedding as its output layer."""
    from stages import memory
    from stages.memory import estimate

    policy = POLICY._replace(tied=300, sizes=SIZES)
    critic = CRITIC._replace(tied=200, sizes=(200, 200, 200))
    monkeypatch.setattr(memory, "model_shape", lambda cfg, hint=None: {"policy": policy, "critic": critic,
                                                                       "sft": policy}[cfg.name_or_path])
    monkeypatch.setattr(memory, "tokenizer_vocab", lambda cfg: None)
    f32 = ["deepspeed.zero_stage=2", "deepspeed.config={data_types: {grad_accum_dtype: fp32}}"]
    ppo = estimate(_ppo(tmp_path, *f32), 1)
    assert ppo["parts"]["policy tied embedding gradients"] == 3 * 2 * 300
    assert ppo["phases"]["policy"].moments["end of backward"] == ["policy reduce bucket",
                                                                  "policy tied embedding gradients"]
    assert "critic tied embedding gradients" not in ppo["parts"]
    assert estimate(_lm("sft", tmp_path, *f32), 1)["parts"]["model tied embedding gradients"] == 3 * 2 * 300
    assert "model tied embedding gradients" not in estimate(_lm("train-rm", tmp_path, *f32), 1)["parts"]
    lm = estimate(_lm("train-rm", tmp_path, *f32, "loss.lm_coef=0.5"), 1)["parts"]
    assert lm["model tied embedding gradients"] == 3 * 2 * 300


# --------------------------------------------------------------------------------------------- printed table
def test_format_estimate_prints_gib_marks_update_parts_and_skips_zeros():
    est = {"world_size": 2, "total": 3 * GIB,
           "parts": {"model weights": 1.5 * GIB, "model gradients": 0.25 * GIB, "model optimizer": 0.0},
           "phases": {"model": Phase(["model gradients"], {})}}
    lines = format_estimate(est).splitlines()
    assert lines[0] == "memory estimate per rank (2 rank(s); arithmetic, see stages/memory.py):"
    assert lines[1] == f"  {'model weights':<38} {1.5:9.3f} GiB"  # "      1.500"
    assert lines[2] == f"  {'model gradients *':<38} {0.25:9.3f} GiB"
    assert lines[3] == f"  {'peak':<38} {3.0:9.3f} GiB"  # the zero optimizer line is left out
    assert "unavailable" in format_estimate(None)


# --------------------------------------------------------------------------------------------- fit to a GPU
def test_micro_batch_choices_split_the_per_rank_batch_of_an_optimizer_step(tmp_path):
    """PPO: the divisors of train.mini_batch_size; SFT/RM: of micro_batch_size x gradient_accumulation_steps."""
    from stages.memory import micro_batch_choices, per_rank_batch

    ppo = _ppo(tmp_path, "train.rollout_batch_size=12", "train.mini_batch_size=12", "train.micro_batch_size=3")
    assert per_rank_batch(ppo) == (12, "train.mini_batch_size = 12")
    assert micro_batch_choices(ppo) == [1, 2, 3, 4, 6, 12]
    sft = _lm("sft", tmp_path, "train.gradient_accumulation_steps=5")
    assert per_rank_batch(sft) == (10, "micro_batch_size x gradient_accumulation_steps = 10")
    assert micro_batch_choices(sft) == [1, 2, 5, 10]


@pytest.mark.parametrize("stage", ["ppo", "sft", "train-rm"])
def test_the_peak_at_each_micro_batch_is_that_micro_batchs_estimate_with_the_shapes_read_once(
        tmp_path, monkeypatch, shapes, stage):
    from stages import memory

    reads = []
    shape_of = memory.model_shape
    monkeypatch.setattr(memory, "model_shape", lambda cfg, hint=None: reads.append(cfg.name_or_path) or shape_of(cfg))

    def cfg(micro: int) -> Any:
        if stage == "ppo":
            return _ppo(tmp_path, f"train.micro_batch_size={micro}")
        return _lm(stage, tmp_path, f"train.micro_batch_size={micro}", "train.gradient_accumulation_steps=4")

    est = memory.estimate(cfg(2), 2, [1, 2, 4])
    assert len(reads) == (2 if stage == "ppo" else 1)  # policy and reward model, or the one model
    assert est["peak_at_micro_batch"][2] == est["total"]
    for m in (1, 4):
        assert est["peak_at_micro_batch"][m] == memory.estimate(cfg(m), 2)["total"], m
    assert est["peak_at_micro_batch"][1] < est["total"] < est["peak_at_micro_batch"][4]
    assert memory.estimate(cfg(2), 2)["peak_at_micro_batch"] == {}


def _fit_est(total: float, peaks: dict[int, float]) -> dict[str, Any]:
    return {"total": total * GIB, "peak_at_micro_batch": {m: p * GIB for m, p in peaks.items()}}


def test_fit_choice_is_the_largest_micro_batch_within_90_percent_else_1() -> None:
    """What --fit-micro-batch chooses (and the pipeline's dry run shows): of peaks 20, 30, 50, 70 GiB at 1, 2, 4,
    8, a 60 GiB GPU (54 usable) takes 4, a 40 GiB one (36) 2, exactly 50 / 0.9 GiB still 4; a 10 GiB one none: 1."""
    from stages.memory import fit_choice

    est = _fit_est(50, {1: 20, 2: 30, 4: 50, 8: 70})
    assert fit_choice(est, 60 * GIB) == (4, True) and fit_choice(est, 40 * GIB) == (2, True)
    assert fit_choice(est, int(50 / 0.9 * GIB) + 1) == (4, True) and fit_choice(est, 10 * GIB) == (1, False)


def test_format_fit_says_whether_the_peak_fits_90_percent_and_the_largest_micro_batch_that_does(tmp_path):
    """A 60 GiB GPU leaves 54 GiB to the estimate: a 50 GiB peak fits with 4 to spare, and of micro-batches 1, 2,
    4, 8 (peaks 20, 30, 50, 70 GiB) 4 is the largest that fits; a 40 GiB GPU (36 usable): 14 GiB over, 2 fits
    (SFT: with the accumulation that keeps micro x accumulation = 8); a 10 GiB GPU: none fits."""
    from stages.memory import format_fit

    ppo = _ppo(tmp_path, "train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=4")
    est = _fit_est(50, {1: 20, 2: 30, 4: 50, 8: 70})
    assert format_fit(est, ppo, 60 * GIB, "--gpu-memory").splitlines() == [
        "GPU memory: 60.000 GiB per GPU (--gpu-memory); the estimate may fill 90% of it, 54.000 GiB (the CUDA "
        "context, the allocator's reserve and NCCL buffers take the rest)",
        "  the peak, 50.000 GiB, fits (4.000 GiB to spare)",
        "  the largest train.micro_batch_size that fits with the same batch (train.mini_batch_size = 8): 4 (this "
        "config's)"]
    lines = format_fit(est, ppo, 40 * GIB, "nvidia-smi").splitlines()
    assert lines[1:] == ["  the peak, 50.000 GiB, does not fit (14.000 GiB over)",
                         "  the largest train.micro_batch_size that fits with the same batch (train.mini_batch_size "
                         "= 8): 2 (now 4); --fit-micro-batch sets it (a --resume keeps its run's without "
                         "--allow-config-change)"]
    sft = _lm("sft", tmp_path, "train.micro_batch_size=4", "train.gradient_accumulation_steps=2")
    assert format_fit(est, sft, 40 * GIB, "x").splitlines()[2] == (
        "  the largest train.micro_batch_size that fits with the same batch (micro_batch_size x "
        "gradient_accumulation_steps = 8): 2 (now 4), with gradient_accumulation_steps 4 (now 2); --fit-micro-batch "
        "sets it (a --resume keeps its run's without --allow-config-change)")
    assert format_fit(est, sft, 10 * GIB, "x").splitlines()[2] == (
        "  no train.micro_batch_size fits with the same batch (micro_batch_size x gradient_accumulation_steps = 8)")


def test_memory_advice_names_only_what_the_config_does_not_do_yet(tmp_path):
    from stages.memory import memory_advice

    assert memory_advice(_lm("sft", tmp_path, "deepspeed.zero_stage=0")) == (
        "a smaller train.micro_batch_size (now 2); a smaller train.eval_micro_batch_size (evaluation); "
        "model.gradient_checkpointing: true; a higher deepspeed.zero_stage (now 0; it partitions over the GPUs); "
        "deepspeed.offload_optimizer: true")
    assert memory_advice(_lm("train-rm", tmp_path, "train.micro_batch_size=1", "model.gradient_checkpointing=true",
                             "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true")) == (
        "a smaller train.eval_micro_batch_size (evaluation); deepspeed.offload_param: true")
    assert memory_advice(_ppo(tmp_path, "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                              "deepspeed.offload_param=true", "model.gradient_checkpointing=true")) == (
        "a smaller train.micro_batch_size (now 2); a smaller train.forward_batch_size (the scoring forwards) or "
        "train.rollout_batch_size (the sampling's KV cache)")
