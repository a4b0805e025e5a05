"""The PPO-max tricks as pure functions, against hand-computed values (PPO-MAX.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.ppo.tricks import (
    RunningMoments,
    batch_summary,
    clip_reward,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k3,
    last_token_mask,
    normalize_reward,
    policy_loss,
    scale_reward,
    token_rewards,
    value_loss,
    whiten,
)


def test_gae_gamma_1_lambda_095_zero_bootstrap_and_masked_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])  # the last position is padding: its 5 must not count
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: 1 + 0 - 0.7 = 0.3; t=1: (0 + 0.7 - 0.6) + 0.95 * 0.3 = 0.385; t=0: 0.1 + 0.95 * 0.385 = 0.46575
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0, 0.0])
    # gamma < 1 discounts the bootstrapped value
    adv2, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    # t=1: 1 - 0.4 = 0.6; t=0: 0 + 0.5 * 0.4 - 0.2 + 0.5 * 0.6 = 0.3
    assert adv2[0].tolist() == pytest.approx([0.3, 0.6])


def test_whitening_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = math.sqrt(2 / 3)
    assert whiten(x, mask)[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], rel=1e-6)
    assert whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([-1 / s + 2, 2, 1 / s + 2, 0], rel=1e-6)


def test_running_moments_equal_numpy_on_the_concatenation_and_two_ranks_equal_one():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen) * 3 + 1 for n in (5, 1, 17, 8)]
    one = RunningMoments()
    for b in batches:
        one.update(b)
    allv = torch.cat(batches).double().numpy()
    assert one.count == len(allv)
    assert one.mean == pytest.approx(np.mean(allv)) and one.var == pytest.approx(np.var(allv))
    # two ranks each see half of every batch; merging their summaries gives the same statistics on both
    ranks = [RunningMoments(), RunningMoments()]
    for b in batches:
        halves = (b[: len(b) // 2], b[len(b) // 2:])
        summaries = [batch_summary(h) for h in halves]
        for r in ranks:
            for s in summaries:
                r.merge(*s)
    assert ranks[0] == ranks[1]
    assert ranks[0].mean == pytest.approx(one.mean) and ranks[0].var == pytest.approx(one.var)


def test_reward_scaling_normalization_and_clipping():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 5.0]))  # mean 3, population std 2 (sqrt(M2 / n); Bessel's sqrt(M2 / (n-1)) is 2.83)
    s = torch.tensor([7.0, -1.0])
    assert scale_reward(s, m).tolist() == pytest.approx([3.5, -0.5])
    assert normalize_reward(s, m).tolist() == pytest.approx([2.0, -2.0])
    assert clip_reward(normalize_reward(s, m), 0.8).tolist() == pytest.approx([0.8, -0.8])


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    # ratio = p_ref / p = 0.5: (0.5 - 1) - log 0.5
    assert kl_k3(logp, ref).item() == pytest.approx(-0.5 + math.log(2))
    assert kl_k3(ref, logp).item() == pytest.approx(1.0 - math.log(2))  # ratio 2
    assert kl_k3(logp, logp).item() == 0.0


def test_score_goes_on_the_last_real_token_only():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert last_token_mask(mask).tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([2.0, -1.0, 7.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.2 - 1.0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(r, expected)


def test_ppo_clip_loss_and_clip_fraction():
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, frac = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)
    assert frac.item() == pytest.approx(2 / 3)


def test_clipped_value_loss_and_clip_fraction():
    v = torch.tensor([[1.0, 0.0, 0.6]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    ret = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.ones(1, 3)
    loss, frac = value_loss(v, old, ret, mask, clip=0.2)
    # errors 1, 0, 0.36; clipped values 0.7, 0.3, 0.6 -> 1.69, 0.09, 0.36: the max is clipped on tokens 1-2
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 0.36) / 3)
    assert frac.item() == pytest.approx(2 / 3)
    plain, frac0 = value_loss(v, old, ret, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.0 + 0.36) / 3) and frac0.item() == 0.0


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    assert entropy_from_logits(torch.tensor([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)
