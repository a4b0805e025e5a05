"""Unit tests of the reward model's heads (stages/reward_model.py) and the PPO model builders (stages/ppo/models.py)
that pin behaviour the other tests leave open: the LM head's empty-batch and frozen-weight paths, float32 outputs of
16-bit models, the untied LM head's initialisation and row copy, the critic's two initialisations, the frozen
models' DeepSpeed JSON and the engines' TrainConfig. Tiny random-init Llama models built from configs, no network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stages.config import ModelConfig, PPOConfig
from stages.errors import CheckpointError
from stages.reward_model import LMHead, RewardModel, _score_head, build_reward_model, float32_linear
from stages.ppo.models import (
    GenerationCopy,
    build_critic,
    build_policy,
    build_reference,
    build_reward,
    disable_dropout,
    engine_train_config,
    freeze,
    frozen_ds_config,
    stop_token_ids,
)

VOCAB = 100
TINY: dict[str, Any] = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
CPU = torch.device("cpu")


class _Tok:
    """The part of a tokenizer that build_model reads: its length and its special ids (pad = the last id)."""

    def __init__(self, n: int = VOCAB) -> None:
        self.n, self.pad_token_id, self.eos_token_id, self.bos_token_id = n, n - 1, 1, None

    def __len__(self) -> int:
        return self.n


def _arch(**kw: Any) -> LlamaConfig:
    body = {k: v for k, v in TINY.items() if k != "model_type"}
    return LlamaConfig(vocab_size=VOCAB, pad_token_id=VOCAB - 1, **{**body, **kw})


def _saved(tmp_path: Path, name: str, model: torch.nn.Module) -> str:
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def _float32_vocab_storage_saved(fn: Any, vocab: int) -> int:
    """Elements of float32 [.., vocab] tensors autograd keeps for backward while fn() runs."""
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // 4
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(saved.values())


# ------------------------------------------------------------------------------------------- reward model
def test_lm_head_with_no_tokens_gives_zero_and_still_reaches_its_weight() -> None:
    """An empty micro-batch gives NLL 0 whose backward still reaches W (a zero gradient, not None)."""
    weight = torch.nn.Parameter(torch.randn(10, 4))
    nll = LMHead(weight, chunk=3)(torch.randn(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert nll.dtype == torch.float32 and nll.item() == 0.0
    nll.backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))


def test_lm_head_checkpoints_its_blocks_when_only_the_hidden_states_need_grad() -> None:
    """A frozen W with trainable hidden states still keeps no float32 [rows, V] logits for backward."""
    torch.manual_seed(0)
    vocab = 50
    hidden = torch.randn(7, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, 16, dtype=torch.bfloat16), requires_grad=False)
    gold = torch.randint(0, vocab, (7,))
    out: list[torch.Tensor] = []
    kept = _float32_vocab_storage_saved(lambda: out.append(LMHead(weight, chunk=4)(hidden, gold)), vocab)
    assert kept == 0
    expected = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), gold, reduction="sum")
    assert out[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_rewards_are_float32_for_a_bf16_model() -> None:
    """RewardModel returns float32 rewards even when the model computes in bf16, and its score head computes in
    float32 (the bf16 hidden state times the bf16 weights, upcast): a bf16 head rounded the score to bf16's steps
    (a peer audit measured a mean error of 0.005 at magnitude 4, and pairs tied that float32 tells apart)."""
    torch.manual_seed(0)
    seqcls = LlamaForSequenceClassification(_arch(num_labels=1)).to(torch.bfloat16).eval()
    with torch.no_grad():
        seqcls.score.weight.mul_(40.0)  # (scores of magnitude ~4, where bf16's steps are 0.03)
    model = RewardModel(seqcls)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        rewards, nll = model(ids, torch.ones_like(ids))
        hidden = seqcls.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
    assert rewards.dtype == torch.float32 and rewards.shape == (2,) and nll is None
    want = hidden.float() @ seqcls.score.weight.float().T
    assert torch.equal(rewards, want.squeeze(-1))
    assert not torch.equal(rewards, (hidden @ seqcls.score.weight.T).float().squeeze(-1))  # (bf16's rounding)
    assert rewards.abs().max() > 1.0


def test_lm_labels_without_an_lm_head_are_a_value_error() -> None:
    """Asking for the LM loss of a reward model built without an LM head raises ValueError."""
    model = RewardModel(LlamaForSequenceClassification(_arch(num_labels=1)).eval())
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="without an LM head"):
        model(ids, torch.ones_like(ids), lm_labels=ids)


@pytest.mark.parametrize("head", [torch.nn.Linear(8, 1, bias=True), torch.nn.Linear(8, 2, bias=False), None])
def test_score_head_check_accepts_only_a_bias_free_one_output_linear(head: torch.nn.Module | None) -> None:
    """_score_head refuses a biased head, a two-output head and a missing head; a bias-free h -> 1 passes."""
    with pytest.raises(CheckpointError, match="bias-free linear `score` head"):
        _score_head(SimpleNamespace(score=head))
    _score_head(SimpleNamespace(score=torch.nn.Linear(8, 1, bias=False)))


def test_build_reward_model_refuses_an_architecture_without_a_score_head() -> None:
    """A sequence classifier whose head is not `score` (BERT's `classifier`) is no reward model here."""
    cfg = ModelConfig(from_config={"model_type": "bert", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64})
    with pytest.raises(CheckpointError, match="bias-free linear `score` head"):
        build_reward_model(cfg, _Tok(), "fp32", {}, seed=0, with_lm_head=False, resize=True)


def test_an_untied_lm_head_of_a_from_config_model_is_random_with_the_initializer_std() -> None:
    """from_config, untied: the LM head is a matrix of its own drawn from N(0, initializer_range)."""
    cfg = ModelConfig(from_config={**TINY, "tie_word_embeddings": False, "initializer_range": 0.05})
    rm = build_reward_model(cfg, _Tok(), "fp32", {}, seed=0, with_lm_head=True, resize=True)
    weight = rm.lm_head.weight
    assert weight is not rm.seqcls.get_input_embeddings().weight and weight.shape == (VOCAB, 32)
    assert weight.std().item() == pytest.approx(0.05, rel=0.1) and abs(weight.mean().item()) < 0.01


def test_an_untied_lm_head_in_a_grown_embedding_keeps_the_source_rows_and_a_zero_pad_row(tmp_path: Path) -> None:
    """Source lm_head.weight rows are copied to the same rows; the row of an added pad token stays zero."""
    torch.manual_seed(0)
    causal = LlamaForCausalLM(_arch(tie_word_embeddings=False))
    src = _saved(tmp_path, "sft", causal)
    rm = build_reward_model(ModelConfig(name_or_path=src), _Tok(VOCAB + 1), "fp32", {}, seed=0,
                            with_lm_head=True, resize=True)
    weight = rm.lm_head.weight.detach()
    assert weight.shape == (VOCAB + 1, 32)
    assert torch.equal(weight[:VOCAB], causal.lm_head.weight.detach())
    assert torch.equal(weight[VOCAB], torch.zeros(32))


def test_an_untied_lm_head_has_the_models_dtype_and_gives_a_float32_nll_in_bf16() -> None:
    """bf16 precision: the own LM head is bf16 like the embedding, and the LM loss runs and is float32."""
    cfg = ModelConfig(from_config={**TINY, "tie_word_embeddings": False})
    rm = build_reward_model(cfg, _Tok(), "bf16", {}, seed=0, with_lm_head=True, resize=True).eval()
    assert rm.lm_head.weight.dtype == rm.seqcls.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        rewards, nll = rm(ids, torch.ones_like(ids), lm_labels=ids)
    assert rewards.dtype == nll.dtype == torch.float32 and torch.isfinite(nll) and nll.item() > 0


# ------------------------------------------------------------------------------------------------ PPO models
def test_float32_linear_upcasts_weight_bias_and_input_of_a_bf16_head() -> None:
    """float32_linear = x W^T + b in float32 for a bf16 Linear with a bias."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 1, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = float32_linear(head, x)
    expected = x.float() @ head.weight.float().T + head.bias.float()
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6, rtol=0)


def _ppo_config(tmp_path: Path, deepspeed: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                **ppo: Any) -> PPOConfig:
    return PPOConfig.model_validate({
        "output_dir": str(tmp_path), "model": {"name_or_path": "stub/policy"},
        "reward_model": {"name_or_path": "stub/rm"}, "data": {"train": "stub/prompts"},
        "train": {"rollout_batch_size": 12, "mini_batch_size": 6, "micro_batch_size": 2, **(train or {})},
        "ppo": ppo, "deepspeed": deepspeed or {},
    })


def test_engine_train_config_takes_each_field_from_its_place(tmp_path: Path) -> None:
    """Accumulation = mini / micro; decay, betas, eps, schedule, warm-up, floor and clip are copied as given."""
    cfg = _ppo_config(tmp_path, train={"weight_decay": 0.1, "adam_betas": [0.8, 0.9], "adam_eps": 1e-6,
                                       "lr_scheduler": "cosine", "warmup_ratio": 0.2, "min_lr_ratio": 0.3},
                      grad_clip=0.7)
    tc = engine_train_config(cfg, 3e-6)
    assert (tc.micro_batch_size, tc.gradient_accumulation_steps, tc.lr) == (2, 3, 3e-6)
    assert (tc.weight_decay, tuple(tc.adam_betas), tc.adam_eps) == (0.1, (0.8, 0.9), 1e-6)
    assert (tc.lr_scheduler, tc.warmup_ratio, tc.min_lr_ratio, tc.gradient_clipping) == ("cosine", 0.2, 0.3, 0.7)


def test_frozen_ds_config_is_none_off_zero3_and_a_zero3_inference_json_on_it(tmp_path: Path) -> None:
    """frozen stage 0: plain copies (None); stage 3: batch = micro x ranks, offload pinned only on a GPU, precision."""
    assert frozen_ds_config(_ppo_config(tmp_path), 2, True) is None
    assert frozen_ds_config(_ppo_config(tmp_path, {"zero_stage": 3, "frozen_zero_stage": 0}), 2, True) is None
    ds = frozen_ds_config(_ppo_config(tmp_path, {"zero_stage": 3, "precision": "fp16"}), 4, True)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 8
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    assert ds["fp16"] == {"enabled": True} and ds["bf16"] == {"enabled": False}
    off = {"zero_stage": 3, "frozen_offload_param": True, "precision": "bf16"}
    for on_gpu in (True, False):
        ds = frozen_ds_config(_ppo_config(tmp_path, off), 1, on_gpu)
        assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": on_gpu}
        assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_freeze_without_deepspeed_is_an_eval_mode_model_without_gradients() -> None:
    """freeze(model, None, cpu): every parameter frozen, eval mode, dropout 0, the same module returned."""
    model = LlamaForCausalLM(_arch(attention_dropout=0.3)).train()
    frozen = freeze(model, None, CPU)
    assert frozen is model and not frozen.training and not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.config.attention_dropout == 0.0


def test_build_policy_switches_dropout_off() -> None:
    """The policy built from a config with attention dropout has dropout 0 in its modules and its config."""
    cfg = SimpleNamespace(model=ModelConfig(from_config={**TINY, "attention_dropout": 0.3}),
                          deepspeed=SimpleNamespace(precision="fp32"), seed=0)
    policy = build_policy(cfg, _Tok(), {})
    assert policy.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in policy.model.layers)


@pytest.mark.parametrize("dtype, precision, expected", [("float32", "bf16", torch.bfloat16),
                                                         ("auto", "bf16", torch.bfloat16),
                                                         ("bfloat16", "fp32", torch.bfloat16)])
def test_the_reference_computes_in_the_policy_engines_dtype_so_the_first_kl_is_zero(
        tmp_path: Path, process_group: Any, dtype: str, precision: str, expected: torch.dtype) -> None:
    """A bf16/fp16 DeepSpeed engine casts a policy loaded in float32 (model.dtype) to its precision; the frozen
    reference, a plain copy at frozen_zero_stage 0, is cast to that dtype too, so that its log-probs equal the
    policy's before any update (k1 KL exactly 0; a float32 reference beside a bf16 policy gave |k1| up to 2e-3).
    An fp32 run keeps model.dtype for both. (Here from_config models: a random init made in bf16 would differ
    from the cast float32 one under transformers 5.17.)"""
    from stages.engine import build_deepspeed_config, initialize_engine
    from stages.ppo.models import engine_train_config

    cfg = _ppo_config(tmp_path, {"precision": precision}).model_copy(update={
        "model": ModelConfig(from_config=TINY, dtype=dtype)})
    tc = engine_train_config(cfg, 1e-5)
    policy = initialize_engine(build_policy(cfg, _Tok(), {}),
                               build_deepspeed_config(tc, cfg.deepspeed, 1, False), tc, 1).module.eval()
    reference = freeze(build_reference(cfg, _Tok(), {}), None, CPU)
    assert next(policy.parameters()).dtype == next(reference.parameters()).dtype == expected
    ids = torch.randint(2, VOCAB - 1, (2, 12))
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, reference(input_ids=ids).logits)


class _SavingTok(_Tok):
    def save_pretrained(self, path: str) -> None:
        Path(path, "tokenizer.json").write_text("{}")


def test_a_saved_policy_or_critic_has_the_dropout_it_was_loaded_with(tmp_path: Path,
                                                                      checkpoints: SimpleNamespace) -> None:
    """PPO trains without dropout, but its checkpoints' config.json keep the loaded config's dropout (a model
    fine-tuned further from them gets it back); the live config stays at 0 after a save."""
    import json

    from stages.checkpoint import save_hf
    from stages.distributed import ONE_PROCESS

    cfg = SimpleNamespace(model=ModelConfig(from_config={**TINY, "attention_dropout": 0.3}),
                          deepspeed=SimpleNamespace(precision="fp32"), seed=0)
    critic = build_critic(_critic_cfg(checkpoints, "reward_model"), _Tok(), _Tok(), {})
    for name, model in [("policy", build_policy(cfg, _Tok(), {})), ("critic", critic.seqcls)]:
        disable_dropout(model)  # (twice: the loaded value is still what is saved)
        save_hf(model, _SavingTok(), tmp_path / name, ONE_PROCESS, {})
        assert json.loads((tmp_path / name / "config.json").read_text())["attention_dropout"] == 0.3, name
        assert model.config.attention_dropout == 0.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A saved causal LM (the SFT policy) and a saved one-label classifier (the RM), both with dropout 0.3."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    policy = LlamaForCausalLM(_arch(attention_dropout=0.3))
    torch.manual_seed(2)
    rm = LlamaForSequenceClassification(_arch(attention_dropout=0.3, num_labels=1, initializer_range=0.3))
    return SimpleNamespace(policy=_saved(tmp, "policy", policy), rm=_saved(tmp, "rm", rm), rm_model=rm.eval())


def _critic_cfg(checkpoints: SimpleNamespace, critic_init: str) -> SimpleNamespace:
    return SimpleNamespace(ppo=SimpleNamespace(critic_init=critic_init), seed=0,
                           model=ModelConfig(name_or_path=checkpoints.policy),
                           reward_model=ModelConfig(name_or_path=checkpoints.rm),
                           deepspeed=SimpleNamespace(precision="fp32"))


def test_a_critic_from_the_reward_model_is_the_reward_model_read_at_every_token(checkpoints: SimpleNamespace) -> None:
    """critic_init reward_model: the RM's weights, V at the last token = the RM's score, dropout off."""
    critic = build_critic(_critic_cfg(checkpoints, "reward_model"), _Tok(), _Tok(), {}).eval()
    assert torch.equal(critic.seqcls.score.weight, checkpoints.rm_model.score.weight)
    assert critic.seqcls.config.attention_dropout == 0.0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        values = critic(ids, torch.ones_like(ids))
        score = checkpoints.rm_model(input_ids=ids).logits[0, 0]
    assert values.shape == (1, 4) and values[0, -1].item() == pytest.approx(score.item(), abs=1e-5)


def test_a_critic_from_the_policy_has_a_zero_head_and_the_policys_backbone(checkpoints: SimpleNamespace) -> None:
    """critic_init policy: the SFT backbone with a zero `score` head (V = 0 everywhere), dropout off."""
    critic = build_critic(_critic_cfg(checkpoints, "policy"), _Tok(), _Tok(), {}).eval()
    assert torch.equal(critic.seqcls.score.weight, torch.zeros(1, 32))
    policy = LlamaForCausalLM.from_pretrained(checkpoints.policy)
    assert torch.equal(critic.seqcls.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert critic.seqcls.config.attention_dropout == 0.0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(critic(ids, torch.ones_like(ids)), torch.zeros(1, 4))


def test_build_reward_refuses_a_causal_lm_whose_score_head_would_be_random(checkpoints: SimpleNamespace) -> None:
    """The frozen reward model must be a trained one-label classifier, not an SFT causal LM."""
    with pytest.raises(CheckpointError, match="not a one-label sequence classifier: point reward_model.name_or_path at"):
        build_reward(ModelConfig(name_or_path=checkpoints.policy), _Tok(), "fp32", {}, 0)
    rm = build_reward(ModelConfig(name_or_path=checkpoints.rm), _Tok(), "fp32", {}, 0)
    assert isinstance(rm, RewardModel) and torch.equal(rm.seqcls.score.weight, checkpoints.rm_model.score.weight)


def test_the_generation_copy_has_the_dtype_of_the_model_it_copies() -> None:
    """A bf16 policy's sampling copy is built in bf16 (not float32), in eval mode without gradients."""
    model = LlamaForCausalLM(_arch()).to(torch.bfloat16)
    copy = GenerationCopy(model, CPU)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.model.parameters())
    assert not copy.model.training


def test_stop_token_ids_leave_out_a_missing_eos() -> None:
    """A tokenizer or generation config without EOS (None) adds no id."""
    policy = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[None, 4]))
    assert stop_token_ids(policy, SimpleNamespace(eos_token_id=None), [7]) == [4, 7]
