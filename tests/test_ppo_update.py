"""Every PPO trick changes the computation: the experience (rewards, advantages) and the update's gradients of
stages/ppo/trainer.py, run with tiny random models behind a stand-in for the DeepSpeed engine, each flag on vs off."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stages.config import PPOConfig
from stages.data import IGNORE, TokenRows
from stages.ppo.models import ValueModel, engine_train_config
from stages.ppo.rollout import Rollout
from stages.ppo.trainer import make_experience, rollout_metrics, update
from stages.ppo.tricks import RunningMoments
from stages.reward_model import RewardModel
from stages.trainer import EpochSampler

VOCAB, EOS, PAD = 40, 1, 0


class StubEngine:
    """What the update needs of a DeepSpeed engine (ZeRO-0, one rank): backward divides by the accumulation
    steps, the optimizer (SGD) steps after the last micro-batch of a mini-batch; every step's flat gradient is
    kept in `grads`."""

    def __init__(self, module: torch.nn.Module, accumulation: int, lr: float = 0.05) -> None:
        self.module, self.accumulation, self.micro = module, accumulation, 0
        self.opt = torch.optim.SGD(module.parameters(), lr=lr)
        self.grads: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation == 0:
            params = [p for p in self.module.parameters() if p.grad is not None]
            self.grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
            self.opt.step()
            self.opt.zero_grad()

    def zero_optimization_stage(self) -> int:
        return 0

    def get_global_grad_norm(self):
        return None

    def get_lr(self) -> list[float]:
        return [0.05]


def _arch() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       pad_token_id=PAD, eos_token_id=EOS, num_labels=1)


def _config(tmp_path, generation: dict | None = None, **ppo) -> PPOConfig:
    return PPOConfig.model_validate({
        "output_dir": str(tmp_path), "model": {"name_or_path": "stub/policy"},
        "reward_model": {"name_or_path": "stub/rm"}, "data": {"train": "stub/prompts", "ptx": "stub/ptx"},
        "train": {"rollout_batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2},
        "ppo": {"kl_coef": 0.1, "ppo_epochs": 2, **ppo}, "generation": generation or {},
    })


def _rollout() -> Rollout:
    """4 prompts (left-padded, width 3) and responses (right-padded, width 4), one truncated."""
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4], [3, 3, 2]])
    prompt_mask = (prompt != 0).long()
    response = torch.tensor([[11, 12, EOS, 0], [13, 14, 15, 16], [17, EOS, 0, 0], [18, 19, 20, EOS]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    return Rollout(prompt, prompt_mask, response, response_mask, torch.tensor([False, True, False, False]))


@pytest.fixture
def dist(process_group):
    """This process as a one-rank process group, its variables (RANK, WORLD_SIZE, ...) set for each test only
    (conftest's process_group), so that no later test inherits them."""
    return process_group


def _models(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(_arch())
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so KL is not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    critic = ValueModel(LlamaForSequenceClassification(_arch()))
    reward = RewardModel(LlamaForSequenceClassification(_arch()))
    return {"policy": StubEngine(policy, 2), "critic": StubEngine(critic, 2), "reference": reference.eval(),
            "reward": reward.eval(), "sampler": None}


def _ptx() -> tuple[TokenRows, EpochSampler]:
    rows = TokenRows(with_positions=False)
    for i in range(8):
        ids = [2 + i, 3, 4 + i, 5, EOS]
        rows.append(ids, [IGNORE, IGNORE] + ids[2:])
    return rows, EpochSampler(len(rows), 2, seed=0)


def run_once(tmp_path, dist, critic_only: bool = False, with_ptx: bool = False, generation: dict | None = None,
             **ppo) -> dict:
    """Experience and update with fixed seeds; returns the experience, the metrics and the gradients."""
    cfg = _config(tmp_path, generation, **ppo)
    models = _models()
    rollout = _rollout()
    moments = RunningMoments(count=8, mean=0.5, m2=8 * 4.0)  # std 2 before this batch
    exp = make_experience(cfg, dist, models, rollout, moments, EOS, iteration=1)
    ptx, sampler = _ptx() if with_ptx else (None, None)
    state = {"ptx_step": 0}
    metrics = update(cfg, dist, models, rollout, exp, 0, critic_only, ptx, sampler, state, PAD)
    return {"exp": exp, "metrics": metrics, "policy": models["policy"].grads, "critic": models["critic"].grads,
            "models": models, "state": state}


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) != len(b) or any(not torch.allclose(x, y, atol=1e-7) for x, y in zip(a, b))


def test_baseline_first_step_has_ratio_one_and_updates_both_models(tmp_path, dist):
    out = run_once(tmp_path, dist)
    assert len(out["policy"]) == 2 and len(out["critic"]) == 2  # 2 epochs x 1 mini-batch
    # old log-probs come from the same forward as the first training pass: the first step's ratio is 1
    m = out["metrics"]
    assert m["policy/ratio"] == pytest.approx(1.0, abs=1e-3)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in out["policy"] + out["critic"])


@pytest.mark.parametrize(
    "flag, on, off, what",
    [
        ("kl_coef", 0.3, 0.0, "rewards"),
        ("kl_estimator", "k3", "k1", "rewards"),
        ("reward_scaling", True, False, "score"),
        ("reward_norm", True, False, "score"),
        ("reward_clip", 0.01, 0.0, "score"),
        ("gamma", 0.5, 1.0, "advantages"),
        ("lam", 0.5, 0.95, "advantages"),
    ],
)
def test_experience_flags_change_the_experience_and_the_gradients(tmp_path, dist, flag, on, off, what):
    a, b = run_once(tmp_path, dist, **{flag: on}), run_once(tmp_path, dist, **{flag: off})
    assert not torch.allclose(a["exp"][what], b["exp"][what])
    assert _differs(a["policy"], b["policy"])


@pytest.mark.parametrize(
    "flag, on, off, model",
    [
        ("adv_norm", True, False, "policy"),
        ("adv_clip", 0.01, 0.0, "policy"),
        ("policy_clip", 0.0001, 0.2, "policy"),
        ("entropy_coef", 0.5, 0.0, "policy"),
        ("ref_importance_sampling", True, False, "policy"),
        ("value_clip", 0.0001, 0.0, "critic"),
    ],
)
def test_update_flags_change_the_gradients(tmp_path, dist, flag, on, off, model):
    a, b = run_once(tmp_path, dist, **{flag: on}), run_once(tmp_path, dist, **{flag: off})
    assert _differs(a[model], b[model])
    # the experience itself is the same: the flag acts in the update only
    assert torch.equal(a["exp"]["advantages"], b["exp"]["advantages"])


def test_logprobs_at_temperature_reach_the_scoring_and_the_update_alike(tmp_path, dist):
    hot = run_once(tmp_path, dist, generation={"temperature": 0.5, "logprobs_at_temperature": True}, ppo_epochs=1)
    base = run_once(tmp_path, dist, generation={"temperature": 0.5}, ppo_epochs=1)
    # old and new log-probs at the same temperature: the one step's ratio is 1 (with T = 1 in the update only: 1.025)
    assert hot["metrics"]["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(hot["exp"]["logp"], base["exp"]["logp"])  # log p(z / 0.5), not log p(z)
    assert _differs(hot["policy"], base["policy"])


def test_rollout_metrics_give_mean_and_std_of_the_raw_and_the_transformed_scores(tmp_path, dist):
    out = run_once(tmp_path, dist, reward_norm=True, reward_clip=0.5)
    exp = out["exp"]
    m = rollout_metrics(_config(tmp_path, reward_norm=True, reward_clip=0.5), dist, _rollout(), exp, [EOS])
    for name, x in (("objective/scores", exp["raw"]), ("objective/scores_transformed", exp["score"])):
        assert m[name] == pytest.approx(float(x.mean()), abs=1e-6)
        assert m[f"{name}_std"] == pytest.approx(float(x.double().std(unbiased=False)), abs=1e-5)
    assert m["objective/scores_transformed_std"] != pytest.approx(m["objective/scores_std"])
    assert "objective/scores_sq" not in m and "objective/scores_transformed_sq" not in m


def test_policy_and_value_clipping_show_in_their_clip_fractions(tmp_path, dist):
    tight = run_once(tmp_path, dist, policy_clip=1e-4, value_clip=1e-4)["metrics"]
    loose = run_once(tmp_path, dist, policy_clip=10.0, value_clip=10.0)["metrics"]
    assert tight["policy/clipfrac"] > 0 and loose["policy/clipfrac"] == 0
    assert tight["val/clipfrac"] > 0 and loose["val/clipfrac"] == 0


def test_ppo_epochs_sets_the_number_of_optimizer_steps(tmp_path, dist):
    assert len(run_once(tmp_path, dist, ppo_epochs=3)["policy"]) == 3
    assert len(run_once(tmp_path, dist, ppo_epochs=1)["critic"]) == 1


def test_ptx_adds_the_lm_loss_on_the_ptx_rows_only(tmp_path, dist):
    on = run_once(tmp_path, dist, with_ptx=True, ptx_coef=0.5)
    off = run_once(tmp_path, dist, with_ptx=True, ptx_coef=0.0)
    assert _differs(on["policy"], off["policy"])
    assert on["metrics"]["loss/ptx"] > 0 and "loss/ptx" not in off["metrics"]
    # one PTX micro-batch per policy micro-batch: 2 epochs x 2 micro-batches
    assert on["state"]["ptx_step"] == 4
    assert not _differs(on["critic"], off["critic"])  # the critic never sees PTX data


def test_critic_pretraining_updates_the_critic_only(tmp_path, dist):
    out = run_once(tmp_path, dist, critic_only=True)
    before = _models()
    assert out["policy"] == [] and len(out["critic"]) == 2
    for p, q in zip(out["models"]["policy"].module.parameters(), before["policy"].module.parameters()):
        assert torch.equal(p, q)
    changed = [not torch.equal(p, q) for p, q in
               zip(out["models"]["critic"].module.parameters(), before["critic"].module.parameters())]
    assert any(changed)
    assert "loss/policy" not in out["metrics"] and "loss/value" in out["metrics"]


def test_grad_clip_and_learning_rates_reach_the_deepspeed_engines(tmp_path):
    from stages.engine import build_deepspeed_config

    cfg = _config(tmp_path, grad_clip=0.25)
    tc = engine_train_config(cfg, cfg.train.critic_lr)
    ds = build_deepspeed_config(tc, cfg.deepspeed, 2, False)
    assert ds["gradient_clipping"] == 0.25
    assert ds["optimizer"]["params"]["lr"] == cfg.train.critic_lr
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
    assert "gradient_clipping" not in build_deepspeed_config(engine_train_config(_config(tmp_path, grad_clip=0.0), 1e-6),
                                                             cfg.deepspeed, 1, False)
