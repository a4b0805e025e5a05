"""Every PPO trick changes the computation: the experience (rewards, advantages) and the update's gradients of
stages/ppo/trainer.py, run with tiny random models behind a stand-in for the DeepSpeed engine, each flag on vs off."""

from __future__ import annotations

import copy
import math
import dataclasses
import threading
from typing import Any, Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stages.config import PPOConfig
from stages.data import IGNORE, TokenRows
from stages.distributed import DistInfo
from stages.ppo.experience import GlobalMeans, global_moments
from stages.ppo.models import ValueModel, engine_train_config
from stages.ppo.rollout import Held, Rollout, response_logprobs
from stages.ppo.ending import RewardEnding
from stages.ppo.trainer import make_experience, rollout_metrics, update
from stages.ppo.tricks import RunningMoments, masked, whiten
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


def _config(tmp_path, generation: dict | None = None, train: dict | None = None, **ppo) -> PPOConfig:
    return PPOConfig.model_validate({
        "output_dir": str(tmp_path), "model": {"name_or_path": "stub/policy"},
        "reward_model": {"name_or_path": "stub/rm"}, "data": {"train": "stub/prompts", "ptx": "stub/ptx"},
        "train": {"rollout_batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2, **(train or {})},
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


def _models(seed: int = 0, accumulation: int = 2) -> dict:
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(_arch())
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so KL is not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    critic = ValueModel(LlamaForSequenceClassification(_arch()))
    reward = RewardModel(LlamaForSequenceClassification(_arch()))
    return {"policy": StubEngine(policy, accumulation), "critic": StubEngine(critic, accumulation),
            "reference": reference.eval(), "reward": reward.eval(), "sampler": None}


def _ptx() -> tuple[TokenRows, EpochSampler]:
    rows = TokenRows(with_positions=False)
    for i in range(8):
        ids = [2 + i, 3, 4 + i, 5, EOS]
        rows.append(ids, [IGNORE, IGNORE] + ids[2:])
    return rows, EpochSampler(len(rows), 2, seed=0)


def run_once(tmp_path, dist, critic_only: bool = False, with_ptx: bool = False, generation: dict | None = None,
             vocab: int | None = None, held: Held = Held(), **ppo) -> dict:
    """Experience and update with fixed seeds; returns the experience, the metrics and the gradients. vocab:
    the rollout's `vocab_size` (the ids its sampler could draw); held: the ids it held back (`Rollout.held`)."""
    cfg = _config(tmp_path, generation, **ppo)
    models = _models()
    rollout = dataclasses.replace(_rollout(), vocab_size=vocab, held=held)
    moments = RunningMoments(count=8, mean=0.5, m2=8 * 4.0)  # std 2 before this batch
    exp = make_experience(cfg, dist, models, rollout, moments, RewardEnding.plain(EOS), iteration=1)
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
    # the reference is neither trained nor tied to the policy: its weights are as built, and none shares memory
    built = _models()["reference"].state_dict()
    for name, value in out["models"]["reference"].state_dict().items():
        assert torch.equal(value, built[name]), name
    policy = {q.data_ptr() for q in out["models"]["policy"].module.parameters()}
    assert not policy & {q.data_ptr() for q in out["models"]["reference"].parameters()}


@pytest.mark.parametrize("ref_is", [False, True])
def test_one_epoch_measures_ratio_one_against_the_sampling_policy(tmp_path, dist, ref_is):
    """ppo_epochs 1: the policy trained is the one that sampled, so the logged ratio is 1, its variance and the
    approx-KL 0 (float32 forward noise aside) -- also with ref_importance_sampling, whose loss takes the ratio
    to the reference but whose metrics still measure the move from the sampling policy (the step's size)."""
    m = run_once(tmp_path, dist, ppo_epochs=1, ref_importance_sampling=ref_is)["metrics"]
    assert m["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert m["policy/ratio_var"] == pytest.approx(0.0, abs=1e-5)
    assert m["policy/approxkl"] == pytest.approx(0.0, abs=1e-8)


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


def test_the_rollouts_vocabulary_reaches_the_scoring_and_the_update(tmp_path, dist):
    """Log-probs over the ids the sampler could draw (VOCAB - 10 of the embedding's VOCAB rows): the old and the
    reference log-probs, the entropy and the first update's new log-probs (ratio 1) alike."""
    part, whole = run_once(tmp_path, dist, vocab=VOCAB - 10, ppo_epochs=1), run_once(tmp_path, dist, ppo_epochs=1)
    rollout, models = _rollout(), _models()
    ids, mask = rollout.sequences()
    for key, name in (("logp", "policy"), ("ref_logp", "reference")):
        want = response_logprobs(models[name], ids, mask, rollout.prompt_width, rollout.response, vocab=VOCAB - 10)[0]
        assert torch.allclose(part["exp"][key], want, atol=1e-6), key
        assert not torch.allclose(part["exp"][key], whole["exp"][key], atol=1e-3), key
    assert part["metrics"]["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert _differs(part["policy"], whole["policy"])


def test_the_ids_held_back_before_min_new_tokens_reach_the_scoring_and_the_update(tmp_path, dist):
    """The old and the reference log-probs leave out the ids the sampler held back at the first positions
    (`Rollout.held`: EOS at position 0 here), and so does the first update's (ratio 1); later positions are
    unchanged."""
    held = Held((EOS, 2), 1)
    part, whole = run_once(tmp_path, dist, held=held, ppo_epochs=1), run_once(tmp_path, dist, ppo_epochs=1)
    rollout, models = _rollout(), _models()
    ids, mask = rollout.sequences()
    for key, name in (("logp", "policy"), ("ref_logp", "reference")):
        want = response_logprobs(models[name], ids, mask, rollout.prompt_width, rollout.response, held=held)[0]
        assert torch.allclose(part["exp"][key], want, atol=1e-6), key
        assert (part["exp"][key][:, 0] - whole["exp"][key][:, 0]).abs().min() > 1e-4, key
        assert torch.equal(part["exp"][key][:, 1:], whole["exp"][key][:, 1:]), key
    assert part["metrics"]["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert _differs(part["policy"], whole["policy"])


def test_validation_scores_in_the_forward_batches_training_uses(tmp_path, dist, monkeypatch):
    """validate's reward-model forwards take at most train.forward_batch_size rows (here 2 of a rollout batch
    of 4), as scoring in training does (no larger memory peak at the first validation), with the same mean; it
    samples whole rollout batches, as training does, and its means leave the stand-in prompts out."""
    from stages.ppo import trainer

    sizes: list[int] = []
    score = trainer.raw_scores

    def recording(gen, reward, ids, mask, truncated, ending):
        sizes.append(ids.shape[0])
        return score(gen, reward, ids, mask, truncated, ending)

    monkeypatch.setattr(trainer, "raw_scores", recording)
    tok = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: VOCAB})()
    prompts = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]
    means = []
    for forward in (2, 8):
        cfg = _config(tmp_path, generation={"max_new_tokens": 3}, train={"forward_batch_size": forward})
        sizes.clear()
        means.append(trainer.validate(cfg, dist, _models(), prompts, tok, [EOS], RewardEnding.plain(EOS)))
        # two batches of the rollout batch's 4 prompts (the second: 1 prompt and 3 stand-ins, not counted), so
        # that decoding keeps the training rollout's shape (one static KV cache, one compiled step)
        assert max(sizes) == min(forward, 4) and sum(sizes) == 8
    sizes.clear()  # the dynamic cache keeps no per-shape state: no stand-ins in the last batch
    cfg = _config(tmp_path, generation={"max_new_tokens": 3, "cache": "dynamic"}, train={"forward_batch_size": 8})
    trainer.validate(cfg, dist, _models(), prompts, tok, [EOS], RewardEnding.plain(EOS))
    assert sizes == [4, 1]
    assert means[0]["eval/reward"] == pytest.approx(means[1]["eval/reward"], abs=1e-5)

    def first_prompt_token(gen, reward, ids, mask, truncated, ending):  # a "score" telling the prompts apart
        return ids.gather(1, mask.argmax(1, keepdim=True)).squeeze(1).float()

    monkeypatch.setattr(trainer, "raw_scores", first_prompt_token)
    cfg = _config(tmp_path, generation={"max_new_tokens": 3}, train={"forward_batch_size": 8})
    got = trainer.validate(cfg, dist, _models(), prompts, tok, [EOS], RewardEnding.plain(EOS))
    assert got["eval/reward"] == pytest.approx((5 + 7 + 8 + 11 + 12) / 5)  # the 3 stand-ins (5s) not counted
    calls: list[int] = []

    def nan_for_the_stand_ins(gen, reward, ids, mask, truncated, ending):  # (the second batch: 1 prompt, 3 stand-ins)
        calls.append(1)
        scores = first_prompt_token(gen, reward, ids, mask, truncated, ending)
        return torch.cat([scores[:1], torch.full_like(scores[1:], float("nan"))]) if len(calls) == 2 else scores

    monkeypatch.setattr(trainer, "raw_scores", nan_for_the_stand_ins)
    kl = trainer.kl_k1
    kl_calls: list[int] = []

    def kl_nan_for_the_stand_ins(logp, ref_logp):  # (per token: NaN in the second batch's stand-in rows)
        kl_calls.append(1)
        value = kl(logp, ref_logp)
        return torch.cat([value[:1], torch.full_like(value[1:], float("nan"))]) if len(kl_calls) == 2 else value

    monkeypatch.setattr(trainer, "kl_k1", kl_nan_for_the_stand_ins)
    gold_calls: list[int] = []

    def gold_nan_for_the_stand_ins(judge, tok, batch, responses):  # (the second batch: 1 prompt, 3 stand-ins)
        gold_calls.append(1)
        return [2.0] + [float("nan")] * (len(batch) - 1) if len(gold_calls) == 2 else [1.0] * len(batch)

    monkeypatch.setattr(trainer, "gold_scores", gold_nan_for_the_stand_ins)
    cfg.data.gold_reward = "toy"
    got = trainer.validate(cfg, dist, _models(), prompts, tok, [EOS], RewardEnding.plain(EOS))
    assert got["eval/reward"] == pytest.approx((5 + 7 + 8 + 11 + 12) / 5)  # left out, not NaN x 0 = NaN
    assert math.isfinite(got["eval/kl"]) and len(kl_calls) == 2
    assert got["eval/gold"] == pytest.approx((4 * 1.0 + 2.0) / 5) and len(gold_calls) == 2


def test_rollout_metrics_give_mean_and_std_of_the_raw_and_the_transformed_scores(tmp_path, dist):
    out = run_once(tmp_path, dist, reward_norm=True, reward_clip=0.5)
    exp = out["exp"]
    m = rollout_metrics(_config(tmp_path, reward_norm=True, reward_clip=0.5), dist, _rollout(), exp, [EOS])
    for name, x in (("objective/scores", exp["raw"]), ("objective/scores_transformed", exp["score"])):
        assert m[name] == pytest.approx(float(x.mean()), abs=1e-6)
        assert m[f"{name}_std"] == pytest.approx(float(x.double().std(unbiased=False)), abs=1e-5)
    assert m["objective/scores_transformed_std"] != pytest.approx(m["objective/scores_std"])
    assert "objective/scores_sq" not in m and "objective/scores_transformed_sq" not in m


def test_rollout_metrics_of_a_hand_made_experience(tmp_path, dist):
    """Every rollout metric from a hand-made experience of 2 rows (6 and 2 response tokens, row 1 truncated),
    pad positions holding values that would show if they were counted: policy log-probs log 0.5, reference log
    0.25 (k1 = log 2, k3 = 0.5 - 1 + log 2 per token), entropies 1 and 3, returns and values whose explained
    variance is 1 - 0.6875 / 1.25 = 0.45."""
    response = torch.tensor([[3, 4, 3, 4, 3, EOS], [5, 6, PAD, PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    rollout = Rollout(torch.tensor([[7], [8]]), torch.ones(2, 1, dtype=torch.long), response, mask,
                      torch.tensor([False, True]))

    def per_token(real: float, pad: float) -> torch.Tensor:
        return torch.where(mask.bool(), torch.tensor(real), torch.tensor(pad))

    log2 = math.log(2)
    exp = {"raw": torch.tensor([1.0, 3.0]), "score": torch.tensor([0.5, -0.5]),
           "logp": per_token(-log2, 5.0), "ref_logp": per_token(-2 * log2, -9.0), "kl": per_token(log2, 0.0),
           "entropy": torch.tensor([[1.0] * 6, [3.0] * 2 + [9.0] * 4]),
           "returns": torch.tensor([[1.0, 2, 3, 4, 1, 2], [3, 4, -100, -100, -100, -100]]),
           "values": torch.tensor([[1.0, 2, 2, 2, 1, 2], [2, 2, 100, 100, 100, 100]]),
           "advantages": torch.tensor([[1.0] * 6, [-1.0] * 2 + [50.0] * 4])}
    m = rollout_metrics(_config(tmp_path), dist, rollout, exp, [EOS])  # kl_coef 0.1, monitor.ngram 3
    k3 = 0.5 - 1 + log2
    expected = {
        "objective/scores": 2.0, "objective/scores_std": 1.0,
        "objective/scores_transformed": 0.0, "objective/scores_transformed_std": 0.5,
        "objective/kl": 8 * log2 / 2, "objective/kl_per_token": log2,  # per response, per token
        "objective/kl_k3": 8 * k3 / 2, "objective/kl_k3_per_token": k3,
        "objective/non_score_reward": -0.1 * 8 * log2 / 2, "objective/rlhf_reward": 0.0 - 0.1 * 8 * log2 / 2,
        "objective/entropy": (6 * 1 + 2 * 3) / 8,
        "rollout/response_length": 4.0, "rollout/cap_share": 0.5,
        "rollout/repetition": (1 / 3 + 0) / 2,  # [3 4 3 4 3]: 3 trigrams, 2 distinct; [5 6]: none
        "rollout/nll_policy": log2, "rollout/nll_reference": 2 * log2,
        "rollout/perplexity": 2.0, "rollout/ref_perplexity": 4.0, "rollout/moss_logged_ppl": 2 ** 0.25,
        "val/values": 14 / 8, "val/returns": 20 / 8, "val/advantages": (6 - 2) / 8, "val/explained_variance": 0.45,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert set(m) == set(expected)  # nothing unpinned


def test_truncation_penalty_is_in_raw_score_units_before_the_reward_statistics(tmp_path, dist):
    """on_truncation: penalty subtracts from the RM's raw score (row 1 is the truncated one); the penalised
    scores then enter the running statistics and are normalised and clipped like any score (README)."""
    def score_with(penalty: float) -> dict:
        gen = {"on_truncation": "penalty", "truncation_penalty": penalty}
        return run_once(tmp_path, dist, generation=gen, reward_norm=True, reward_clip=0.8)["exp"]

    pen, plain = score_with(3.0), score_with(0.0)
    assert (plain["raw"] - pen["raw"]).tolist() == pytest.approx([0.0, 3.0, 0.0, 0.0], abs=1e-5)
    moments = RunningMoments(count=8, mean=0.5, m2=8 * 4.0)  # run_once's statistics before the batch
    moments.update(pen["raw"])
    expected = ((pen["raw"].double() - moments.mean) / moments.std).clamp(-0.8, 0.8)
    assert pen["score"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_policy_and_value_clipping_show_in_their_clip_fractions(tmp_path, dist):
    tight = run_once(tmp_path, dist, policy_clip=1e-4, value_clip=1e-4)["metrics"]
    loose = run_once(tmp_path, dist, policy_clip=0.999, value_clip=10.0)["metrics"]  # (epsilon < 1)
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
    out = run_once(tmp_path, dist, critic_only=True, with_ptx=True, ptx_coef=0.5)
    assert out["state"]["ptx_step"] == 0  # no PTX batch drawn: the PTX data order starts with the policy's updates
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
    assert build_deepspeed_config(engine_train_config(_config(tmp_path, grad_clip=0.0), 1e-6), cfg.deepspeed, 1,
                                  False)["gradient_clipping"] == 0  # (left out, DeepSpeed would clip at 1.0)


def test_each_engine_gets_its_own_learning_rate_schedule_and_step_count(tmp_path, dist, monkeypatch):
    """build_models, as rlhf ppo calls it: the policy engine's optimizer gets train.policy_lr, the critic's
    train.critic_lr (set apart here), both the config's warm-up share, scheduler and clip, each its own step
    count (for its schedule); the frozen models get no engine."""
    from stages.ppo import trainer

    built: dict[str, tuple] = {}
    monkeypatch.setattr(trainer, "build_policy", lambda cfg, tok, ds: LlamaForCausalLM(_arch()))
    monkeypatch.setattr(trainer, "build_reference", lambda cfg, tok, ds: LlamaForCausalLM(_arch()))
    monkeypatch.setattr(trainer, "build_critic", lambda cfg, tok, rm_tok, ds: ValueModel(
        LlamaForSequenceClassification(_arch())))
    monkeypatch.setattr(trainer, "build_reward", lambda *args: RewardModel(LlamaForSequenceClassification(_arch())))

    def record(model, ds, tc, total):
        built["policy" if isinstance(model, LlamaForCausalLM) else "critic"] = (ds, tc, total)
        return StubEngine(model, 1)

    monkeypatch.setattr(trainer, "initialize_engine", record)
    cfg = _config(tmp_path, train={"policy_lr": 3e-6, "critic_lr": 7e-5, "warmup_ratio": 0.25,
                                   "lr_scheduler": "linear"}, grad_clip=0.5)
    models = trainer.build_models(cfg, dist, None, None, {"policy": 12, "critic": 20})
    assert set(built) == {"policy", "critic"} and isinstance(models["reference"], LlamaForCausalLM)
    for name, lr, total in (("policy", 3e-6, 12), ("critic", 7e-5, 20)):
        ds, tc, steps = built[name]
        assert ds["optimizer"]["params"]["lr"] == lr and tc.lr == lr, name
        assert (tc.warmup_ratio, tc.lr_scheduler, ds["gradient_clipping"], steps) == (0.25, "linear", 0.5, total)


def test_rank_spread_is_the_largest_difference_between_ranks_of_any_value(monkeypatch):
    """reward_stats/rank_spread: gather_floats gives every rank's values one rank after another; the spread is
    the largest max - min over ranks of any one value (0 when the statistics are merged alike everywhere)."""
    from stages.ppo import trainer

    ranks = [[8.0, 0.5, 2.0], [8.0, 0.75, 1.5], [8.0, 0.5, 2.125]]
    monkeypatch.setattr(trainer, "gather_floats", lambda values: [x for r in ranks for x in r])
    assert trainer.rank_spread(ranks[0]) == 0.625  # the std: 2.125 - 1.5 (the mean's spread is 0.25)
    ranks = [[8.0, 0.5, 2.0]] * 2
    assert trainer.rank_spread(ranks[0]) == 0.0


# --------------------------------------------------------------------------------------------- token means
LENGTHS = (5, 1, 7, 3)  # response tokens of the 4 rollouts below: 16 in all


def _uneven_rollout(rows: list[int] | None = None) -> Rollout:
    """4 prompts (left-padded, width 3) and responses of 5, 1, 7 and 3 tokens (right-padded, width 7; the 7-token
    one truncated); `rows`: those rollouts only (a rank's share)."""
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4], [3, 3, 2]])
    response = torch.tensor([[11, 12, 13, 14, EOS, 0, 0], [EOS, 0, 0, 0, 0, 0, 0],
                             [15, 16, 17, 18, 19, 20, 21], [22, 23, EOS, 0, 0, 0, 0]])
    response_mask = (torch.arange(7) < torch.tensor(LENGTHS)[:, None]).long()
    out = Rollout(prompt, (prompt != 0).long(), response, response_mask, torch.tensor([False, False, True, False]))
    return out if rows is None else out.select(rows)


class RecordingEngine(StubEngine):
    """StubEngine that also keeps every loss handed to backward, divided by the accumulation steps as the
    engine (and DeepSpeed's `_scale_loss_by_gas`) divides it: one list per optimizer step."""

    def __init__(self, module: torch.nn.Module, accumulation: int) -> None:
        super().__init__(module, accumulation)
        self.losses: list[list[float]] = [[]]

    def backward(self, loss: torch.Tensor) -> None:
        assert loss.dtype == torch.float32, loss.dtype  # (as the model's float32 losses: no float64 promotion)
        self.losses[-1].append(float(loss.detach()) / self.accumulation)
        super().backward(loss)

    def step(self) -> None:
        super().step()
        if self.micro % self.accumulation == 0:
            self.losses.append([])


def _recording_models(accumulation: int) -> dict:
    models = _models(accumulation=accumulation)
    for name in ("policy", "critic"):
        models[name] = RecordingEngine(models[name].module, accumulation)
    return models


def _flat_grad(module: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    module.zero_grad()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).clone()
    module.zero_grad()
    return grad


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 summation-order noise: within 1e-6 absolute, 1e-5 relative."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ppo", [{}, {"adv_norm": True, "entropy_coef": 0.05, "value_clip": 0.2, "kl_coef": 0.1},
                                 {"value_clip": 1e-4}],  # a clip that some values pass: val/clipfrac not 0
                         ids=["plain", "adv_norm-entropy-value_clip", "tight-value_clip"])
def test_micro_batch_split_does_not_change_the_update(tmp_path, dist, ppo):
    """One mini-batch of 4 rollouts with 5, 1, 7 and 3 response tokens (16 in all), as 1, 2 or 4 micro-batches
    (engine accumulation 4, 2, 1): each micro-batch's loss is its token mean x n x k / 16 (k = ranks x
    accumulation) and the engine divides by the accumulation, so every split backpropagates the token mean over
    all 16 tokens: the same gradients and the same weights after each of 2 epochs (float32 noise only). A
    per-micro-batch mean would weight the 1-token rollout like the 7-token one when micro = 1."""
    rollout = _uneven_rollout()
    exp = make_experience(_config(tmp_path, **ppo), dist, _models(), rollout,
                          RunningMoments(count=8, mean=0.5, m2=32.0), RewardEnding.plain(EOS), iteration=1)
    runs = {}
    for micro in (4, 2, 1):
        cfg = _config(tmp_path, train={"micro_batch_size": micro}, ppo_epochs=2, **ppo)
        models = _recording_models(accumulation=4 // micro)
        metrics = update(cfg, dist, models, rollout, exp, 0, False, None, None, {"ptx_step": 0}, PAD)
        runs[micro] = {"models": models, "metrics": metrics}
        for name in ("policy", "critic"):
            assert len(models[name].grads) == 2  # 2 epochs x 1 mini-batch: 2 optimizer steps
            assert [len(x) for x in models[name].losses] == [4 // micro, 4 // micro, 0]

    mask = rollout.response_mask.bool()
    adv = exp["advantages"]
    assert int(mask.sum()) == 16
    base = runs[4]
    for micro in (2, 1):
        run = runs[micro]
        for name in ("policy", "critic"):
            for g, g4 in zip(run["models"][name].grads, base["models"][name].grads):
                assert _close(g, g4), f"{name} gradient, micro-batch {micro} vs 4: max diff {(g - g4).abs().max()}"
            params = [torch.cat([p.detach().flatten() for p in x["models"][name].module.parameters()])
                      for x in (run, base)]
            assert _close(*params)
        for key in ("loss/policy", "loss/value", "policy/ratio", "policy/clipfrac", "val/clipfrac"):
            assert run["metrics"][key] == pytest.approx(base["metrics"][key], rel=1e-5, abs=1e-6)
    if ppo.get("value_clip") == 1e-4:  # the value clip fraction is a token mean too (not a mean of micro-batch ones)
        assert 0 < base["metrics"]["val/clipfrac"] < 1
    # the weights did move, by far more than the tolerance
    before = _models()
    moved = torch.cat([(p.detach() - q.detach()).flatten() for p, q in
                       zip(base["models"]["policy"].module.parameters(), before["policy"].module.parameters())])
    assert moved.abs().max() > 1e-3

    if ppo:
        return
    # Hand check (plain settings), first step: the policy equals the old policy (ratio 1), so each token's loss is
    # -A_t, and the critic equals the old critic (V = V_old, G - V = A), so each token's value loss is A_t^2 / 2.
    # The losses backpropagated in one step add up to the token means over the 16 tokens, for every split:
    want_policy = -float(adv[mask].sum()) / 16
    want_value = 0.5 * float((adv[mask] ** 2).sum()) / 16
    for micro, run in runs.items():
        assert sum(run["models"]["policy"].losses[0]) == pytest.approx(want_policy, rel=1e-5, abs=1e-7)
        assert sum(run["models"]["critic"].losses[0]) == pytest.approx(want_value, rel=1e-5)
    # with one rollout per micro-batch (in shuffled order), rollout i's share is -(sum of its A_t) / 16, whatever
    # its length (its own token mean x n_i x k / 16 / accumulation = mean_i x n_i x 4 / 16 / 4)
    shares = sorted(-float(adv[i][mask[i]].sum()) / 16 for i in range(4))
    assert sorted(runs[1]["models"]["policy"].losses[0]) == pytest.approx(shares, rel=1e-5, abs=1e-7)
    # the first step's gradients are those of the token-mean losses over the whole mini-batch, computed directly
    fresh = _models()
    ids, att = rollout.sequences()
    logp, _ = response_logprobs(fresh["policy"].module, ids, att, 3, rollout.response)
    token_mean = -(adv * masked(logp, mask)).sum() / 16
    values = fresh["critic"].module(ids, att)[:, 2:-1]
    g_policy = _flat_grad(fresh["policy"].module, token_mean)
    g_value = _flat_grad(fresh["critic"].module, 0.5 * masked((values - exp["returns"]) ** 2, mask).sum() / 16)
    for micro, run in runs.items():
        assert _close(run["models"]["policy"].grads[0], g_policy)
        assert _close(run["models"]["critic"].grads[0], g_value)
    # ... and not those of the mean of per-rollout means (what a per-micro-batch mean gives with micro = 1):
    logp, _ = response_logprobs(fresh["policy"].module, ids, att, 3, rollout.response)
    n = mask.sum(1, keepdim=True)
    per_rollout = -((adv * masked(logp, mask)).sum(1, keepdim=True) / n).mean()
    g_rows = _flat_grad(fresh["policy"].module, per_rollout)
    assert (g_rows - g_policy).abs().max() > 100 * 1e-6 + 1e-5 * g_policy.abs().max()


# ------------------------------------------------------------------------- each update trick, hand-checked
def _first_step(tmp_path, dist, micro: int = 4, mini: int = 4, ptx: bool = False, **ppo) -> tuple:
    """One epoch over the uneven rollout (16 response tokens) with these settings: the rollout, its
    experience, the recording engines and the update's metrics."""
    rollout = _uneven_rollout()
    cfg = _config(tmp_path, train={"micro_batch_size": micro, "mini_batch_size": mini}, ppo_epochs=1, **ppo)
    exp = make_experience(cfg, dist, _models(), rollout, RunningMoments(count=8, mean=0.5, m2=32.0),
                          RewardEnding.plain(EOS), iteration=1)
    models = _recording_models(accumulation=mini // micro)
    rows, sampler = _ptx() if ptx else (None, None)
    metrics = update(cfg, dist, models, rollout, exp, 0, False, rows, sampler, {"ptx_step": 0}, PAD)
    return rollout, exp, models, metrics


def _hand_advantages(adv: torch.Tensor, mask: torch.Tensor, norm: bool, clip: float) -> torch.Tensor:
    """PPO-MAX.md's advantage tricks over the masked tokens, by hand: whitened (population variance, eps 1e-8)
    with `norm`, then clipped to [-clip, clip] when clip > 0."""
    out = adv.clone()
    if norm:
        a = adv[mask].double()
        out = ((adv.double() - a.mean()) / (((a - a.mean()) ** 2).mean() + 1e-8).sqrt()).float()
    if clip > 0:
        out = out.clamp(-clip, clip)
    return torch.where(mask, out, torch.zeros(()))


@pytest.mark.parametrize("ppo", [{}, {"adv_norm": True}, {"adv_clip": 0.03}, {"adv_norm": True, "adv_clip": 0.5},
                                 {"entropy_coef": 0.3}, {"ref_importance_sampling": True, "policy_clip": 0.05}],
                         ids=["plain", "adv_norm", "adv_clip", "adv_norm-then-clip", "entropy", "ref_is"])
def test_each_update_trick_gives_the_hand_computed_first_step(tmp_path, dist, ppo):
    """The first optimizer step's policy loss and gradient, computed here from the formulas of PPO-MAX.md on a
    fresh copy of the policy: token mean over the 16 tokens of -min(rho A', clip(rho) A'), where A' is the
    advantage whitened over the mini-batch (adv_norm), then clipped (adv_clip); rho = exp(logp - old) = 1 at the
    first step, or exp(logp - ref_logp) with ref_importance_sampling (clipped around the reference); minus
    entropy_coef x the token-mean entropy (a bonus: lowering it would raise the loss). A wrong sign, bound,
    order or normalizer changes the gradient; "differs from off" alone could not tell."""
    rollout, exp, models, metrics = _first_step(tmp_path, dist, **ppo)
    mask = rollout.response_mask.bool()
    adv = _hand_advantages(exp["advantages"], mask, ppo.get("adv_norm", False), ppo.get("adv_clip", 0.0))
    if "adv_clip" in ppo:  # the bound acts on both sides here (on the whitened advantages with adv_norm)
        before = _hand_advantages(exp["advantages"], mask, ppo.get("adv_norm", False), 0.0)[mask]
        assert (before > ppo["adv_clip"]).any() and (before < -ppo["adv_clip"]).any()
    fresh = _models()["policy"].module
    ids, att = rollout.sequences()
    logp, ent = response_logprobs(fresh, ids, att, 3, rollout.response, with_entropy=True)
    old = exp["ref_logp"] if ppo.get("ref_importance_sampling") else logp.detach()
    rho = torch.exp(torch.where(mask, logp - old, torch.zeros(())))
    eps = ppo.get("policy_clip", 0.2)
    per_token = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))
    loss = torch.where(mask, per_token, torch.zeros(())).sum() / 16
    if "entropy_coef" in ppo:
        loss = loss - ppo["entropy_coef"] * torch.where(mask, ent, torch.zeros(())).sum() / 16
    assert sum(models["policy"].losses[0]) == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
    assert _close(models["policy"].grads[0], _flat_grad(fresh, loss))
    if ppo.get("ref_importance_sampling"):
        clipped = (-adv * rho.clamp(1 - eps, 1 + eps) > -adv * rho) & mask
        assert 0 < metrics["policy/clipfrac"] == pytest.approx(float(clipped.sum()) / 16, abs=1e-6)


def test_a_micro_batch_skipped_as_non_finite_is_left_out_of_the_update_metrics(tmp_path, dist, monkeypatch):
    """train.on_nonfinite: skip, the first of the 2 micro-batches of every optimizer step with a NaN policy and
    value loss: those are skipped (2 epochs x policy and critic), and the logged losses are the other
    micro-batches' (finite; the skipped ones' NaN made them NaN)."""
    from stages.ppo import trainer

    calls = {"policy": 0, "value": 0}

    def poisoned(real, name):
        def loss(*args, **kwargs):
            value, frac = real(*args, **kwargs)
            calls[name] += 1
            return (value * float("nan"), frac) if calls[name] % 2 == 1 else (value, frac)
        return loss

    monkeypatch.setattr(trainer, "policy_loss", poisoned(trainer.policy_loss, "policy"))
    monkeypatch.setattr(trainer, "value_loss", poisoned(trainer.value_loss, "value"))
    cfg = _config(tmp_path, train={"on_nonfinite": "skip"})
    rollout = _rollout()
    exp = make_experience(cfg, dist, _models(), rollout, RunningMoments(count=8, mean=0.5, m2=32.0),
                          RewardEnding.plain(EOS), iteration=1)
    metrics = update(cfg, dist, _models(), rollout, exp, 0, False, None, None, {"ptx_step": 0}, PAD)
    assert metrics["skipped"] == 4.0 and calls == {"policy": 4, "value": 4}
    for key in ("loss/policy", "loss/value", "policy/ratio", "policy/clipfrac", "val/clipfrac"):
        assert math.isfinite(metrics[key]), key


def test_advantages_are_whitened_per_mini_batch(tmp_path, dist):
    """adv_norm with mini-batches of 2 rollouts: the first step's gradient is that of the advantages whitened
    over its own mini-batch's tokens (and normalised by their count), not over the whole rollout batch's."""
    rollout, exp, models, _ = _first_step(tmp_path, dist, micro=2, mini=2, adv_norm=True)
    mask = rollout.response_mask.bool()
    fresh = _models()["policy"].module
    ids, att = rollout.sequences()
    whole = _hand_advantages(exp["advantages"], mask, True, 0.0)

    def grad_for(rows: list[int], adv: torch.Tensor) -> torch.Tensor:
        m = mask[rows]
        logp, _ = response_logprobs(fresh, ids[rows], att[rows], 3, rollout.response[rows])
        return _flat_grad(fresh, -(adv * logp).masked_fill(~m, 0).sum() / int(m.sum()))

    first = models["policy"].grads[0]
    pairs = [[a, b] for a in range(4) for b in range(a + 1, 4)]
    own = [_close(first, grad_for(r, _hand_advantages(exp["advantages"][r], mask[r], True, 0.0))) for r in pairs]
    assert sum(own) == 1, own  # exactly the mini-batch that was drawn
    rows = pairs[own.index(True)]
    assert not _close(first, grad_for(rows, whole[rows]))


def test_ptx_loss_is_the_coefficient_times_the_ptx_token_mean_whatever_the_split(tmp_path, dist):
    """ptx_coef 0.5 with 2 micro-batches (accumulation 2): the step's gradient is that of the policy token mean
    plus 0.5 x the NLL summed over both micro-batches' PTX rows / their trained tokens (each micro-batch's
    PTX rows are the PTX sampler's next global batch, this rank's share)."""
    from stages.lm import collate

    rollout, exp, models, metrics = _first_step(tmp_path, dist, micro=2, mini=4, ptx=True, ptx_coef=0.5)
    mask = rollout.response_mask.bool()
    fresh = _models()["policy"].module
    ids, att = rollout.sequences()
    logp, _ = response_logprobs(fresh, ids, att, 3, rollout.response)
    loss = -(exp["advantages"] * logp).masked_fill(~mask, 0).sum() / 16
    rows, sampler = _ptx()
    nll, tokens = 0.0, 0
    for step in (0, 1):
        batch = collate([rows[j] for j in sampler.indices(step)[:2]], PAD, torch.device("cpu"))
        logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = nll + torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1),
                                                      ignore_index=IGNORE, reduction="sum")
        tokens += int((labels != IGNORE).sum())
    total = loss + 0.5 * nll / tokens
    assert _close(models["policy"].grads[0], _flat_grad(fresh, total))
    assert metrics["loss/ptx"] == pytest.approx(float(nll.detach()) / tokens, rel=1e-5)


def _two_epoch_update(tmp_path, dist) -> tuple[dict[str, float], torch.Tensor]:
    """update() over 2 PPO epochs of one mini-batch (16 response tokens each): its metrics, and the second epoch's
    per-token log-ratio logp - old logp [16], that of the policy after the first optimizer step, computed here
    (0 in the first epoch: the policy is the old one)."""
    rollout = _uneven_rollout()
    cfg = _config(tmp_path, train={"micro_batch_size": 4}, ppo_epochs=2)
    exp = make_experience(cfg, dist, _models(), rollout, RunningMoments(count=8, mean=0.5, m2=32.0),
                          RewardEnding.plain(EOS), iteration=1)
    models = _recording_models(accumulation=1)
    after_first: list[torch.nn.Module] = []
    step = models["policy"].step

    def keep_first() -> None:
        step()
        if not after_first:
            after_first.append(copy.deepcopy(models["policy"].module))

    models["policy"].step = keep_first
    metrics = update(cfg, dist, models, rollout, exp, 0, False, None, None, {"ptx_step": 0}, PAD)
    mask = rollout.response_mask.bool()
    ids, att = rollout.sequences()
    with torch.no_grad():
        logp, _ = response_logprobs(after_first[0], ids, att, 3, rollout.response)
    diff = (logp - exp["logp"])[mask]
    assert float(diff.abs().max()) > 1e-3  # the first step moved the policy
    return metrics, diff


def test_approxkl_is_half_the_mean_squared_log_ratio(tmp_path, dist):
    """policy/approxkl = 0.5 x token mean of (logp - old logp)^2 over both epochs' 32 tokens."""
    metrics, diff = _two_epoch_update(tmp_path, dist)
    assert metrics["policy/approxkl"] == pytest.approx(0.5 * float((diff ** 2).sum()) / 32, rel=1e-4)


# --------------------------------------------------------------------------------------------- two ranks
class TwoRanks:
    """Two ranks as two threads of this process. `all_reduce_sum`, patched into every module that calls it, adds
    the two threads' vectors as the real collective does (a rank calling with a different length, or a call on
    one rank only, fails or times out instead of passing); `calls[r]` keeps what rank r contributed."""

    def __init__(self, monkeypatch) -> None:
        import stages.ppo.experience
        import stages.ppo.trainer
        import stages.trainer

        self.barrier = threading.Barrier(2, timeout=60)
        self.local = threading.local()
        self.slots: list[torch.Tensor | None] = [None, None]
        self.calls: list[list[list[float]]] = [[], []]
        for module in (stages.ppo.experience, stages.ppo.trainer, stages.trainer):
            monkeypatch.setattr(module, "all_reduce_sum", self.all_reduce_sum)

    def all_reduce_sum(self, values, device) -> torch.Tensor:
        rank = self.local.rank
        mine = torch.as_tensor(values, dtype=torch.float64).detach().clone().flatten()
        self.calls[rank].append(mine.tolist())
        self.slots[rank] = mine
        self.barrier.wait()
        total = self.slots[0] + self.slots[1]
        self.barrier.wait()  # both have read before either writes its next vector
        return total

    def grad_mean(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient averaged over the two ranks, as DeepSpeed's data-parallel all-reduce gives it."""
        return (self.all_reduce_sum(grad, grad.device) / 2).to(grad.dtype).reshape(grad.shape)

    def run(self, fn: Callable[[DistInfo], Any]) -> list[Any]:
        """fn(DistInfo of rank r) on ranks 0 and 1 at once; their results."""
        out: list[Any] = [None, None]
        errors: list[BaseException] = []

        def main(rank: int) -> None:
            self.local.rank = rank
            try:
                out[rank] = fn(DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu")))
            except BaseException as e:  # noqa: BLE001 - re-raised below, after both threads end
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


class RankEngine(StubEngine):
    """StubEngine on one of TwoRanks: the accumulated gradients are averaged over both ranks before the SGD step
    (DeepSpeed's data parallelism), so both ranks hold the same weights after every step."""

    def __init__(self, module: torch.nn.Module, accumulation: int, ranks: TwoRanks) -> None:
        super().__init__(module, accumulation)
        self.ranks = ranks

    def step(self) -> None:
        if (self.micro + 1) % self.accumulation == 0:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad = self.ranks.grad_mean(p.grad)
        super().step()


def test_global_moments_and_means_over_two_ranks_equal_one_process_over_all_rows(dist, monkeypatch):
    """Rank 0 holds response tokens 1, 2 | 3 and rank 1 holds 4, 10 (padding: 99, -7, never counted). Over all 5:
    n 5, mean 20 / 5 = 4, variance 130 / 5 - 4^2 = 10 (rank 0 alone: mean 2, variance 2/3); whitening uses those;
    their token mean, (sum 6, 3 tokens) and (sum 14, 2 tokens), is 20 / 5 = 4 (not the mean of means, 4.5)."""
    x = [torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]]), torch.tensor([[4.0, 10.0, -7.0]])]
    m = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 0]])]
    cpu = torch.device("cpu")
    # one process (the real all-reduce, one rank) over the concatenated rows
    x_all, m_all = torch.cat(x), torch.cat(m)
    assert global_moments(x_all, m_all, cpu) == pytest.approx((4.0, 10.0))
    whole = whiten(x_all, m_all.float(), mean=4.0, var=10.0)
    assert whole[m_all.bool()].tolist() == pytest.approx([(v - 4) / 10**0.5 for v in (1, 2, 3, 4, 10)], rel=1e-6)
    one = GlobalMeans()
    one.add("loss", 6.0, 3)
    one.add("loss", 14.0, 2)
    assert one.reduce(cpu) == {"loss": pytest.approx(4.0)}

    ranks = TwoRanks(monkeypatch)

    def on_rank(d: DistInfo):
        mean, var = global_moments(x[d.rank], m[d.rank], d.device)
        g = GlobalMeans()
        g.add("loss", masked(x[d.rank], m[d.rank]).sum(), m[d.rank].sum())
        return (mean, var), whiten(x[d.rank], m[d.rank].float(), mean=mean, var=var), g.reduce(d.device)

    out = ranks.run(on_rank)
    for r in (0, 1):
        moments, whitened, means = out[r]
        assert moments == pytest.approx((4.0, 10.0))
        assert torch.allclose(whitened, whole[[0, 1]] if r == 0 else whole[[2]])
        assert means == {"loss": pytest.approx(4.0)}
    assert ranks.calls[0][0] == [3.0, 6.0, 14.0] and ranks.calls[1][0] == [2.0, 14.0, 116.0]  # n, sum, sum x^2
    assert ranks.calls[0][1] == [6.0, 3.0] and ranks.calls[1][1] == [14.0, 2.0]  # GlobalMeans: sum, count


@pytest.mark.parametrize("micro", [1, 2])
def test_two_ranks_make_the_same_experience_and_update_as_one_process(tmp_path, dist, monkeypatch, micro):
    """The 4 rollouts (5, 1, 7, 3 response tokens) on one process (mini-batch 4, micro-batch 2), or rollouts 0-1
    on rank 0 (6 tokens) and 2-3 on rank 1 (10 tokens), mini-batch 2 each, micro-batch `micro`. With reward
    normalization (running statistics merged across ranks), advantage whitening over the mini-batch's tokens on
    both ranks, the loss scaled by k / (16 global tokens), k = 2 ranks x accumulation, and the gradients
    averaged over the ranks, each rank's share of the experience, the gradients of 2 epochs, the weights after
    them and the logged token-mean metrics equal one process's."""
    ppo = {"reward_norm": True, "adv_norm": True, "kl_coef": 0.1, "entropy_coef": 0.05, "value_clip": 0.2,
           "ppo_epochs": 2}

    def run(d: DistInfo, rows: list[int], train: dict, models: dict):
        cfg = _config(tmp_path, train=train, **ppo)
        rollout = _uneven_rollout(rows)
        moments = RunningMoments(count=8, mean=0.5, m2=32.0)
        exp = make_experience(cfg, d, models, rollout, moments, RewardEnding.plain(EOS), iteration=1)
        metrics = update(cfg, d, models, rollout, exp, 0, False, None, None, {"ptx_step": 0}, PAD)
        return {"exp": exp, "moments": moments, "metrics": metrics, "models": models}

    single = run(dist, [0, 1, 2, 3], {"rollout_batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2},
                 _models(accumulation=2))
    ranks = TwoRanks(monkeypatch)
    train = {"rollout_batch_size": 2, "mini_batch_size": 2, "micro_batch_size": micro}
    rank_models = [_models() for _ in range(2)]  # here, not in the threads: _models seeds the global generator
    for models in rank_models:
        for name in ("policy", "critic"):
            models[name] = RankEngine(models[name].module, 2 // micro, ranks)
    out = ranks.run(lambda d: run(d, [[0, 1], [2, 3]][d.rank], train, rank_models[d.rank]))

    for r, rows in ((0, [0, 1]), (1, [2, 3])):
        mine = out[r]
        assert (mine["moments"].count, mine["moments"].mean, mine["moments"].m2) == pytest.approx(
            (single["moments"].count, single["moments"].mean, single["moments"].m2))
        for key in ("score", "rewards", "advantages", "returns"):
            assert torch.allclose(mine["exp"][key], single["exp"][key][rows], atol=1e-6), key
        for name in ("policy", "critic"):
            assert len(mine["models"][name].grads) == 2
            for g, g1 in zip(mine["models"][name].grads, single["models"][name].grads):
                assert _close(g, g1), f"{name} gradient, rank {r}: max diff {(g - g1).abs().max()}"
            params = [torch.cat([p.detach().flatten() for p in x["models"][name].module.parameters()])
                      for x in (mine, single)]
            assert _close(*params)
        for key in ("loss/policy", "loss/value", "loss/entropy", "policy/ratio", "policy/approxkl",
                    "policy/clipfrac", "val/clipfrac"):
            assert mine["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6), key
    # the token-count all-reduce: 5 + 1 = 6 tokens on rank 0, 7 + 3 = 10 on rank 1, 16 in all, once per epoch
    assert [c for c in ranks.calls[0] if c == [6.0]] == [[6.0]] * 2
    assert [c for c in ranks.calls[1] if c == [10.0]] == [[10.0]] * 2


@pytest.mark.parametrize("more_metrics", [False, True])
def test_experience_and_update_read_few_values_back_to_the_host(tmp_path, dist, host_reads, more_metrics):
    # on a GPU each read waits for every queued kernel; metrics stay on the device until one reduce, so the
    # reads do not grow with what is logged: per micro-batch the loss guard's flag, per optimizer step the
    # gradient norm, per mini-batch the advantages' global moments, one metrics reduce; no row list indexes a
    # tensor (the shuffled order goes to the device once per epoch); the experience reads its non-finite check
    # and its reward statistics once each
    flags = {"entropy_coef": 0.01, "value_clip": 0.2} if more_metrics else {}
    cfg = _config(tmp_path, adv_norm=True, **flags)  # 2 PPO epochs of one mini-batch of 2 micro-batches each
    models, rollout = _models(), _rollout()
    exp = make_experience(cfg, dist, models, rollout, RunningMoments(), RewardEnding.plain(EOS), iteration=1)
    assert sum(host_reads.values()) == 2, host_reads
    host_reads.clear()
    ptx, sampler = _ptx() if more_metrics else (None, None)
    update(cfg, dist, models, rollout, exp, 0, False, ptx, sampler, {"ptx_step": 0}, PAD)
    micro_batches, steps, mini_batches = 8, 4, 2
    assert sum(host_reads.values()) == micro_batches + steps + mini_batches + 1, host_reads


def test_validation_reports_the_kl_from_the_reference_of_its_own_samples(tmp_path, dist, monkeypatch):
    """eval/kl: k1 summed over each held-out response, averaged over the real prompts (stand-ins left out), as
    objective/kl is over the rollouts; 0 for a policy that is its reference."""
    from stages.ppo import trainer

    sampled: list[Rollout] = []
    sample = trainer.sample
    monkeypatch.setattr(trainer, "sample", lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1])
    tok = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: VOCAB})()
    prompts = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]  # 2 batches of 4: the second has 3 stand-ins
    cfg = _config(tmp_path, generation={"max_new_tokens": 4})
    models = _models()
    got = trainer.validate(cfg, dist, models, prompts, tok, [EOS], RewardEnding.plain(EOS))
    per_response = []
    for rollout in sampled:
        ids, att = rollout.sequences()
        args = (ids, att, rollout.prompt_width, rollout.response)
        logp, _ = response_logprobs(models["policy"].module, *args)
        ref, _ = response_logprobs(models["reference"], *args)
        per_response += ((logp - ref) * rollout.response_mask).sum(1).tolist()
    want = sum(per_response[:5]) / 5  # the 5 real prompts; rows 6-8 are stand-ins
    assert got["eval/kl"] == pytest.approx(want, rel=1e-5) and abs(want) > 1e-3
    models["reference"] = copy.deepcopy(models["policy"].module).eval()
    same = trainer.validate(cfg, dist, models, prompts, tok, [EOS], RewardEnding.plain(EOS))
    assert same["eval/kl"] == pytest.approx(0.0, abs=1e-6)

# ------------------------------------------------------------- plumbing pinned by mutation testing (2026-12-05)
# multi-rank PTX, validation and NaN-skip agreement, metrics beyond the trivial point, validation's RNG and
# stand-ins, save_best's refusal, the mini-batch shuffle

def test_two_ranks_with_ptx_make_the_same_update_as_one_process(tmp_path, dist, monkeypatch):
    """ptx_coef 0.5; one process (mini 4, micro 2: PTX rows indices(0)[:2] then indices(1)[:2]) vs two ranks
    (mini 2, micro 1: rank r takes row r of indices(0) and of indices(1)). Every PTX row is used once per step,
    each rank its own share, and the PTX token mean is over all ranks' tokens: the same gradient."""
    rows, _ = _ptx()
    ppo = {"ptx_coef": 0.5, "ppo_epochs": 1}

    def run(d: DistInfo, which: list[int], train: dict, models: dict) -> dict:
        cfg = _config(tmp_path, train=train, **ppo)
        rollout = _uneven_rollout(which)
        exp = make_experience(cfg, d, models, rollout, RunningMoments(count=8, mean=0.5, m2=32.0),
                              RewardEnding.plain(EOS), iteration=1)
        state = {"ptx_step": 0}
        metrics = update(cfg, d, models, rollout, exp, 0, False, rows, EpochSampler(len(rows), 2, seed=0), state, PAD)
        return {"metrics": metrics, "models": models, "state": state}

    single = run(dist, [0, 1, 2, 3], {"rollout_batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2},
                 _models(accumulation=2))
    ranks = TwoRanks(monkeypatch)
    rank_models = [_models() for _ in range(2)]
    for models in rank_models:
        for name in ("policy", "critic"):
            models[name] = RankEngine(models[name].module, 2, ranks)
    train = {"rollout_batch_size": 2, "mini_batch_size": 2, "micro_batch_size": 1}
    out = ranks.run(lambda d: run(d, [[0, 1], [2, 3]][d.rank], train, rank_models[d.rank]))
    for r in (0, 1):
        assert out[r]["state"]["ptx_step"] == 2
        g, g1 = out[r]["models"]["policy"].grads[0], single["models"]["policy"].grads[0]
        assert _close(g, g1), f"rank {r}: max diff {(g - g1).abs().max()}"
        assert out[r]["metrics"]["loss/ptx"] == pytest.approx(single["metrics"]["loss/ptx"], rel=1e-5)


def _first_prompt_token(gen, reward, ids, mask, truncated, ending):  # a "score" telling the prompts apart
    return ids.gather(1, mask.argmax(1, keepdim=True)).squeeze(1).float()


def test_validation_on_two_ranks_scores_every_prompt_once(tmp_path, dist, monkeypatch):
    """5 held-out prompts on 2 ranks, batches of 1: rank 0 samples prompts 0, 2, 4 and rank 1 prompts 1, 3 (and a
    stand-in, not counted): the mean "score" (the prompt's first token) is over the 5 prompts, on both ranks."""
    from stages.ppo import trainer

    monkeypatch.setattr(trainer, "raw_scores", _first_prompt_token)
    tok = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: VOCAB})()
    prompts = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]
    cfg = _config(tmp_path, generation={"max_new_tokens": 3, "cache": "dynamic"},
                  train={"rollout_batch_size": 1, "mini_batch_size": 1, "micro_batch_size": 1})
    ranks = TwoRanks(monkeypatch)
    models = [_models() for _ in range(2)]
    out = ranks.run(lambda d: trainer.validate(cfg, d, models[d.rank], prompts, tok, [EOS], RewardEnding.plain(EOS)))
    assert out[0]["eval/reward"] == out[1]["eval/reward"] == pytest.approx((5 + 7 + 8 + 11 + 12) / 5)


def test_a_nan_on_one_rank_skips_the_rollout_on_every_rank(tmp_path, dist, monkeypatch):
    """train.on_nonfinite: skip with a NaN score on rank 1 only: both ranks return None (no update, no running
    statistics merge, which rank 1 alone would then not join)."""
    from stages.ppo import trainer

    real = trainer.score_rollout
    ranks = TwoRanks(monkeypatch)

    def poisoned(cfg, models, rollout, ending, for_update=True):
        exp = real(cfg, models, rollout, ending, for_update)
        if ranks.local.rank == 1:
            exp["raw"][0] = float("nan")
        return exp

    monkeypatch.setattr(trainer, "score_rollout", poisoned)
    cfg = _config(tmp_path, train={"rollout_batch_size": 2, "mini_batch_size": 2, "on_nonfinite": "skip"},
                  reward_norm=True)
    models = [_models() for _ in range(2)]
    moments = [RunningMoments(count=8, mean=0.5, m2=32.0) for _ in range(2)]
    out = ranks.run(lambda d: make_experience(cfg, d, models[d.rank], _uneven_rollout([[0, 1], [2, 3]][d.rank]),
                                              moments[d.rank], RewardEnding.plain(EOS), iteration=1))
    assert out == [None, None]
    assert all(m.count == 8 for m in moments)  # the statistics untouched on both ranks


class NormEngine(StubEngine):
    """StubEngine reporting scripted global gradient norms, one per optimizer step."""

    def __init__(self, module, accumulation, norms):
        super().__init__(module, accumulation)
        self.norms = list(norms)

    def get_global_grad_norm(self):
        return self.norms[len(self.grads) - 1]


def test_the_logged_gradient_norm_is_the_mean_over_the_updates_optimizer_steps(tmp_path, dist):
    """2 PPO epochs x 1 mini-batch: 2 optimizer steps per engine, norms 1 and 3 (policy) and 10 and 30 (critic)
    as the engines report them: grad_norm/* is their mean, 2 and 20."""
    cfg = _config(tmp_path, ppo_epochs=2)
    rollout = _uneven_rollout()
    models = _models()
    exp = make_experience(cfg, dist, models, rollout, RunningMoments(count=8, mean=0.5, m2=32.0),
                          RewardEnding.plain(EOS), iteration=1)
    models["policy"] = NormEngine(models["policy"].module, 2, [1.0, 3.0])
    models["critic"] = NormEngine(models["critic"].module, 2, [10.0, 30.0])
    metrics = update(cfg, dist, models, rollout, exp, 0, False, None, None, {"ptx_step": 0}, PAD)
    assert metrics["grad_norm/policy"] == 2.0 and metrics["grad_norm/critic"] == 20.0


def test_ratio_variance_is_that_of_the_second_epochs_moved_policy(tmp_path, dist):
    """policy/ratio_var = E[rho^2] - E[rho]^2 over both epochs' tokens (32): rho = 1 in the first epoch, and
    exp(logp - old) of the policy after the first step in the second, computed here (ratio != 1, so a formula
    that only agrees at rho = 1 is caught). In float64 from the log-prob difference: r - 1 of a policy that
    barely moved summed in float32 made E[r^2] - E[r]^2 off by 5 % at a std of 1e-3, negative at 1e-4."""
    metrics, diff = _two_epoch_update(tmp_path, dist)
    rho = torch.cat([torch.ones(16, dtype=torch.float64), torch.exp(diff.double())])
    assert metrics["policy/ratio"] == pytest.approx(float(rho.mean()), rel=1e-12)
    assert metrics["policy/ratio_var"] > 0
    assert metrics["policy/ratio_var"] == pytest.approx(float(((rho - rho.mean()) ** 2).mean()), rel=1e-6)


def test_validation_samples_the_same_stream_every_time_and_leaves_the_training_rng_alone(tmp_path, dist):
    """Two validations of the same policy, the global generator moved on between them (as training moves it):
    the same samples, so the same metrics; and the training random stream after a validation is the one it
    would have been without it."""
    from stages.ppo import trainer

    tok = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: VOCAB})()
    prompts = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]
    cfg = _config(tmp_path, generation={"max_new_tokens": 6, "cache": "dynamic"})
    models = _models()
    torch.manual_seed(123)
    first = trainer.validate(cfg, dist, models, prompts, tok, [EOS], RewardEnding.plain(EOS))
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after)  # validation drew nothing from the training generator
    torch.rand(100)  # training moves the generator on
    second = trainer.validate(cfg, dist, models, prompts, tok, [EOS], RewardEnding.plain(EOS))
    assert second == first


def test_validation_length_cap_share_and_gold_leave_the_stand_in_prompts_out(tmp_path, dist, monkeypatch):
    """A scripted sampler: the prompt starting with token 5 gets a 1-token response cut at max_new_tokens, every
    other prompt a 3-token response that stops; the gold judge gives a prompt's first token. 5 real prompts in 2
    static-cache batches of 4 (the second: 1 real + 3 stand-ins, copies of prompt 0): length (1 + 4 x 3) / 5 =
    2.6, cap_share 1 / 5, gold (5 + 7 + 8 + 11 + 12) / 5 = 8.6 -- counting the stand-ins would give 2.0, 0.5 and
    7.25."""
    from stages.ppo import trainer
    from stages.ppo.rollout import Rollout

    def scripted(model, ids, mask, gen, stop_ids, pad_id, vocab, prompt_capacity=None):
        first = ids.gather(1, mask.argmax(1, keepdim=True)).squeeze(1)
        short = first == 5
        response = torch.tensor([[20, PAD, PAD] if s else [20, 21, EOS] for s in short.tolist()])
        return Rollout(ids, mask, response, (response != PAD).long(), short.clone(), VOCAB)

    monkeypatch.setattr(trainer, "sample", scripted)
    monkeypatch.setattr(trainer, "gold_scores", lambda kind, tok, prompts, responses: [float(p[0]) for p in prompts])
    tok = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: VOCAB})()
    prompts = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]
    cfg = _config(tmp_path, generation={"max_new_tokens": 3})
    cfg.data = cfg.data.model_copy(update={"gold_reward": "toy"})
    got = trainer.validate(cfg, dist, _models(), prompts, tok, [EOS], RewardEnding.plain(EOS))
    assert got["eval/response_length"] == pytest.approx(2.6)
    assert got["eval/cap_share"] == pytest.approx(0.2)
    assert got["eval/gold"] == pytest.approx(8.6)


def test_save_best_refuses_non_finite_policy_weights_and_keeps_the_previous_best(tmp_path, process_group):
    from types import SimpleNamespace

    from conftest import tiny_engine
    from stages.errors import CheckpointError
    from stages.ppo.trainer import save_best

    engine, tok = tiny_engine()
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "marker").write_text("previous best")
    with torch.no_grad():
        next(engine.module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to write .*best: non-finite policy weights"):
        save_best({"policy": SimpleNamespace(module=engine.module)}, tok, tmp_path, process_group, {"stage": "ppo"})
    assert (tmp_path / "best" / "marker").read_text() == "previous best" and not (tmp_path / ".tmp-best").exists()


def test_save_best_out_of_gpu_memory_is_raised_as_it_is_and_keeps_the_previous_best(tmp_path, process_group,
                                                                                     monkeypatch):
    """ZeRO-3 gathers the policy to save it: running out of GPU memory there is the error itself (the CLI says
    what fits), marked "writing .../best", not a failed write; the partial copy goes, the previous best/ stays."""
    from types import SimpleNamespace

    from conftest import tiny_engine
    from stages.errors import WHILE_ATTR
    from stages.ppo import trainer

    engine, tok = tiny_engine()
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "marker").write_text("previous best")
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def gather_fails(*args):
        (tmp_path / ".tmp-best").mkdir()
        raise oom

    monkeypatch.setattr(trainer, "save_hf", gather_fails)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        trainer.save_best({"policy": SimpleNamespace(module=engine.module)}, tok, tmp_path, process_group, {})
    assert raised.value is oom and getattr(oom, WHILE_ATTR) == f"writing {tmp_path / 'best'}"
    assert (tmp_path / "best" / "marker").read_text() == "previous best" and not (tmp_path / ".tmp-best").exists()


def test_each_epoch_and_iteration_shuffles_the_rollouts_reproducibly(tmp_path, dist, monkeypatch):
    """The update's mini-batch order: a permutation of the rollouts per PPO epoch, another in each epoch and
    each iteration (not the rollout order), and the same again for the same iteration (a resumed run)."""
    from stages.ppo import trainer

    orders: list[list[int]] = []
    real = trainer.chunks

    def recording(items, size):
        if isinstance(items, torch.Tensor) and size == 2:  # the mini-batch split of the epoch's order
            orders.append(items.tolist())
        return real(items, size)

    monkeypatch.setattr(trainer, "chunks", recording)
    cfg = _config(tmp_path, train={"rollout_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 1}, ppo_epochs=2)
    rollout = _uneven_rollout()
    exp = make_experience(cfg, dist, _models(), rollout, RunningMoments(count=8, mean=0.5, m2=32.0),
                          RewardEnding.plain(EOS), iteration=1)
    runs = []
    for iteration in (0, 1, 0):
        orders.clear()
        update(cfg, dist, _models(), rollout, exp, iteration, False, None, None, {"ptx_step": 0}, PAD)
        assert len(orders) == 2 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
        runs.append([tuple(o) for o in orders])
    assert runs[0] == runs[2]  # reproducible for a given iteration
    assert runs[0] != runs[1]  # another iteration, another order
    assert len(set(runs[0] + runs[1])) > 1 and any(o != (0, 1, 2, 3) for o in runs[0] + runs[1])


def test_eval_kl_is_the_sum_over_each_response_of_the_log_ratio_at_the_sampling_temperature(monkeypatch):
    """generate() with a reference: per response sum_t [log pi(y_t) - log pi_ref(y_t)] over its sampled tokens
    (the stop token included, padding not), log-probs at the generation temperature with
    logprobs_at_temperature -- recomputed here from the captured samples."""
    import torch

    from stages import evaluate as ev
    from stages.config import GenerationConfig, PPODataConfig
    from stages.ppo.ending import RewardEnding
    from stages.ppo.rollout import response_logprobs

    sampled = []
    real = ev.sample
    monkeypatch.setattr(ev, "sample", lambda *a, **k: sampled.append(real(*a, **k)) or sampled[-1])
    models = _models()
    tok = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: VOCAB})()
    gen = GenerationConfig(max_new_tokens=5, temperature=0.5, logprobs_at_temperature=True, cache="dynamic")
    s = ev.EvalSettings(policy="p", reward_model="r", data=PPODataConfig(train="x.jsonl"), generation=gen, batch_size=2)
    policy = models["policy"].module.eval()
    out = ev.generate(policy, [[5, 6], [7], [8, 9, 10]], s, tok, models["reward"], [EOS], RewardEnding.plain(EOS),
                      torch.device("cpu"), models["reference"])
    want = []
    for roll in sampled:
        ids, att = roll.sequences()
        args = (ids, att, roll.prompt_width, roll.response)
        lp, _ = response_logprobs(policy, *args, temperature=0.5)
        ref, _ = response_logprobs(models["reference"], *args, temperature=0.5)
        want += ((lp - ref) * roll.response_mask).sum(1).tolist()
    assert out.kl == pytest.approx(want, rel=1e-5, abs=1e-6) and max(abs(k) for k in want) > 1e-3
