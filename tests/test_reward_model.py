"""Reward-model pieces without training: the loss terms and metrics against hand-computed values, the reward read
at the last real token (left/right padding, pad == EOS), the LM head, the distinct pad token."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from conftest import GradOnlyEngine
from stages.config import ModelConfig
from stages.errors import CheckpointError
from stages.lm import shifted_nll_sum
from stages.models import EOS, PAD, build_model, ensure_distinct_pad, train_tokenizer
from stages.pairs import PairRows
from stages.reward import accuracy, center_loss, collate_pairs, pair_loss, reward_metrics
from stages.reward_model import build_reward_model, last_token_index, positions_from_mask

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def test_pair_loss_centring_and_accuracy_by_hand():
    r_c, r_r = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    # -log sigmoid(d): d = 2 -> log(1 + e^-2); d = 0 -> log 2; d = -2 -> log(1 + e^2)
    expected = [math.log1p(math.exp(-2)), math.log(2), math.log1p(math.exp(2))]
    assert pair_loss(r_c, r_r).tolist() == pytest.approx(expected, rel=1e-6)
    # a required margin of 1 on the first pair: d = 2 - 1
    assert pair_loss(r_c, r_r, torch.tensor([1.0, 0, 0]))[0].item() == pytest.approx(math.log1p(math.exp(-1)))
    assert center_loss(r_c, r_r).tolist() == [4.0, 0.0, 16.0]
    assert accuracy(r_c, r_r) == pytest.approx(1 / 3)  # the tie counts as wrong


def test_reward_metrics_by_hand():
    m = reward_metrics([1.0, 3.0], [0.0, 4.0], [0.0, 0.0], prefix="eval")
    # rewards 1, 3, 0, 4: mean 2, population std sqrt((1 + 1 + 4 + 4) / 4)
    assert m["eval/accuracy"] == 0.5 and m["eval/margin"] == 0.0
    assert m["eval/reward_mean"] == 2.0 and m["eval/reward_std"] == pytest.approx(math.sqrt(2.5))
    assert (m["eval/reward_min"], m["eval/reward_max"]) == (0.0, 4.0)
    assert (m["eval/chosen_reward"], m["eval/rejected_reward"]) == (2.0, 2.0)
    assert m["eval/loss"] == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2)


def test_last_token_index_and_positions_for_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.fixture(scope="module")
def eos_pad_tokenizer():
    """A tokenizer whose pad token is its EOS (as many base models ship)."""
    tok = train_tokenizer([f"the answer to {i} is {i + 1}" for i in range(100)], vocab_size=300, min_frequency=1)
    tok.pad_token = tok.eos_token
    return tok


def _tiny_reward(tok, **arch):
    torch.manual_seed(0)
    cfg = ModelConfig(from_config={**TINY, **arch})
    return build_reward_model(cfg, tok, "fp32", {}, seed=0, with_lm_head=True, resize=True).eval()


def test_reward_is_read_at_the_last_real_token_whatever_the_padding_even_when_pad_is_eos(eos_pad_tokenizer):
    tok = eos_pad_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    model = _tiny_reward(tok)
    eos = tok.eos_token_id
    seqs = [tok("the answer to 3 is 4")["input_ids"] + [eos], tok("the answer to 12 is")["input_ids"] + [eos]]
    with torch.no_grad():
        alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0].item() for s in seqs]
        width = max(map(len, seqs))
        for side in ("right", "left"):
            ids = torch.full((2, width), eos)  # padding with the EOS id itself
            mask = torch.zeros((2, width), dtype=torch.long)
            for i, s in enumerate(seqs):
                span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
                ids[i, span], mask[i, span] = torch.tensor(s), 1
            batched = model(ids, mask)[0].tolist()
            assert batched == pytest.approx(alone, abs=1e-5), side
        # and it is the score of the final EOS's hidden state, not of the token before it
        hidden = model.seqcls.model(torch.tensor([seqs[0]])).last_hidden_state
        assert alone[0] == pytest.approx(model.seqcls.score(hidden[0, -1]).item(), abs=1e-6)
        assert alone[0] != pytest.approx(model.seqcls.score(hidden[0, -2]).item(), abs=1e-4)


def test_a_masked_gap_before_an_appended_eos_leaves_the_score_unchanged(eos_pad_tokenizer):
    """PPO scores a response that stopped on a non-EOS stop token with EOS appended after the response's right
    padding (stages.ppo.rollout.raw_scores): [.., stop, pad, pad, EOS] with the pads masked must score as the
    contiguous [.., stop, EOS] the RM was trained on (positions count real tokens; pads are not attended)."""
    tok = eos_pad_tokenizer
    model = _tiny_reward(tok)
    eos, stop = tok.eos_token_id, tok.convert_tokens_to_ids("is")
    row = tok("the answer to 3")["input_ids"] + [stop]
    with torch.no_grad():
        alone = model(torch.tensor([row + [eos]]), torch.ones(1, len(row) + 1, dtype=torch.long))[0].item()
        gap = model(torch.tensor([row + [7, 7, eos]]), torch.tensor([[1] * len(row) + [0, 0, 1]]))[0].item()
        misread = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0].item()
    assert gap == pytest.approx(alone, abs=1e-5) and misread != pytest.approx(alone, abs=1e-3)


def _tokenizer_without_pad_token():
    """A byte-level BPE tokenizer whose only special token is EOS, with pad = EOS (like many base models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["the answer is 4"] * 10, trainers.BpeTrainer(
        vocab_size=270, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=EOS)


def test_a_pad_equal_to_eos_gets_a_token_of_its_own_and_the_embedding_grows(tmp_path):
    tok = _tokenizer_without_pad_token()
    n = len(tok)
    src = tmp_path / "base"
    build_model(ModelConfig(from_config=TINY), tok, "fp32", {}, seed=0).save_pretrained(src)
    tok.save_pretrained(src)
    assert ensure_distinct_pad(tok) is True
    assert len(tok) == n + 1 and tok.pad_token == PAD and tok.pad_token_id == n != tok.eos_token_id
    assert ensure_distinct_pad(tok) is False  # already distinct
    cfg = ModelConfig(name_or_path=str(src))
    with pytest.raises(CheckpointError, match=f"tokenizer has {n + 1} tokens but the model's embedding has {n} rows"):
        build_model(cfg, tok, "fp32", {}, seed=0, head="reward")
    seqcls = build_model(cfg, tok, "fp32", {}, seed=0, head="reward", resize=True)
    assert seqcls.get_input_embeddings().weight.shape[0] == n + 1 and seqcls.config.pad_token_id == n
    # a tokenizer that already has <|pad|> in its vocabulary just points pad at it
    ours = train_tokenizer(["a b c"] * 5, vocab_size=280, min_frequency=1)
    ours.pad_token = ours.eos_token
    before = len(ours)
    assert ensure_distinct_pad(ours) is False and len(ours) == before and ours.pad_token == PAD


def test_lm_loss_of_the_reward_model_is_the_causal_lm_loss(tmp_path):
    """With tied embeddings the LM head is the input embedding; untied, the source checkpoint's lm_head.weight is
    loaded. Either way the NLL equals the causal LM's on the same weights."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer([f"the answer to {i} is {i + 1}" for i in range(100)], vocab_size=300, min_frequency=1)
    ids = torch.tensor([tok("the answer to 5 is 6")["input_ids"] + [tok.eos_token_id]])
    labels = ids.clone()
    labels[0, :3] = -100
    for tied in (True, False):
        src = tmp_path / f"lm-tied-{tied}"
        causal = build_model(ModelConfig(from_config={**TINY, "tie_word_embeddings": tied}), tok, "fp32", {}, seed=1)
        causal.save_pretrained(src)
        tok.save_pretrained(src)
        rm = build_reward_model(ModelConfig(name_or_path=str(src)), tok, "fp32", {}, seed=0, with_lm_head=True,
                                resize=False).eval()
        assert (rm.lm_head.weight is rm.seqcls.get_input_embeddings().weight) == tied
        with torch.no_grad():
            _, nll = rm(ids, torch.ones_like(ids), lm_labels=labels)
            expected = shifted_nll_sum(AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits, labels)
        assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
        rm.lm_head.chunk = 2  # logits made two positions at a time: the same sum
        with torch.no_grad():
            assert rm(ids, torch.ones_like(ids), lm_labels=labels)[1].item() == pytest.approx(nll.item(), rel=1e-6)
    # a source without an LM head (a reward model) cannot provide the LM loss
    rm.seqcls.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    with pytest.raises(CheckpointError, match="lm_coef > 0 needs the LM head"):
        build_reward_model(ModelConfig(name_or_path=str(tmp_path / "rm"), from_config=None), tok, "fp32", {},
                           seed=0, with_lm_head=True, resize=False)


def test_collate_pairs_puts_chosen_first_and_trains_lm_on_chosen_only():
    from stages.data import TokenizedExample

    rows = PairRows()
    rows.append(TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([5, 8], [-100, 8]), 0.5)
    rows.append(TokenizedExample([5, 9], [-100, 9]), TokenizedExample([5, 9, 9, 9], [-100, 9, 9, 9]), 0.0)
    batch = collate_pairs(rows, [1, 0], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 9, 0, 0], [5, 6, 7, 0], [5, 9, 9, 9], [5, 8, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 3, 4, 2]
    assert batch["lm_labels"].tolist() == [[-100, 9, -100, -100], [-100, 6, 7, -100]] + [[-100] * 4] * 2
    assert batch["margin"].tolist() == [0.0, 0.5]


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _pair_setup() -> tuple[Any, list[dict[str, torch.Tensor]], PairRows, int]:
    """A reward model (with its LM head), 4 pairs with margins 0, 0.3, 0.6, 0.9 (the prompt's first 4 tokens
    untrained), their two micro-batches of 2 pairs, and the pad id."""
    from stages.data import TokenizedExample

    tok = train_tokenizer([f"the answer to {i} is {i + 1}" for i in range(100)], vocab_size=300, min_frequency=1)
    model = build_reward_model(ModelConfig(from_config=TINY), tok, "fp32", {}, seed=0, with_lm_head=True,
                               resize=False)
    rows = PairRows()
    for i in range(4):
        c = tok(f"the answer to {i} is {i + 1}")["input_ids"] + [tok.eos_token_id]
        r = tok(f"the answer to {i} is {i + 7}")["input_ids"] + [tok.eos_token_id]
        rows.append(TokenizedExample(c, [-100] * 4 + c[4:]), TokenizedExample(r, [-100] * 4 + r[4:]), 0.3 * i)
    batches = [collate_pairs(rows, idx, tok.pad_token_id, torch.device("cpu")) for idx in ([0, 1], [2, 3])]
    return model, batches, rows, tok.pad_token_id


def test_train_step_counts_a_tied_pair_as_wrong(monkeypatch) -> None:
    """The logged training accuracy counts r+ > r- only, as `accuracy` does: chosen [2, 0.5] against rejected
    [1, 0.5] is one right and one tie, 0.5 (a zero-initialised score head, all ties, logs 0, not 1); margin
    mean(r+ - r-) = 0.5."""
    from stages import reward
    from stages.config import RMLossConfig
    from stages.distributed import DistInfo

    class FixedRewards(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask, lm_labels=None):  # rows: chosen..., then rejected...
            return self.w * torch.tensor([2.0, 0.5, 1.0, 0.5]), None

    monkeypatch.setattr(reward, "all_reduce_sum", lambda v, d: torch.as_tensor(v, dtype=torch.float64))
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "lm_labels": torch.full((4, 3), -100), "margin": torch.zeros(2)}
    stats = reward.train_step(GradOnlyEngine(FixedRewards(), 1), [batch], DistInfo(0, 0, 1, torch.device("cpu")),
                              RMLossConfig())
    assert stats["accuracy"] == 0.5 and stats["margin"] == pytest.approx(0.5)


@pytest.mark.parametrize("lm_coef, center_coef", [(0.0, 0.0), (0.0, 0.5), (0.7, 0.0)])
def test_train_step_gradient_is_that_of_the_stated_loss(monkeypatch, host_reads, lm_coef, center_coef):
    """One rank, two micro-batches with margins: the accumulated gradient equals the gradient of
    mean_pairs[-log sigmoid(r+ - r- - m) + center_coef (r+ + r-)^2] + lm_coef * token-mean NLL(chosen),
    and each term changes it."""
    from stages import reward
    from stages.config import RMLossConfig
    from stages.distributed import DistInfo

    monkeypatch.setattr(reward, "all_reduce_sum", lambda v, d: torch.as_tensor(v, dtype=torch.float64))
    model, batches, rows, pad_id = _pair_setup()
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def step_grads(cfg: RMLossConfig) -> tuple[dict, dict[str, torch.Tensor]]:
        model.zero_grad()
        stats = reward.train_step(GradOnlyEngine(model, len(batches)), batches, dist, cfg)
        return stats, {n: _grad(p) for n, p in model.named_parameters()}

    stats, got = step_grads(RMLossConfig(lm_coef=lm_coef, center_coef=center_coef))
    model.zero_grad()
    whole = collate_pairs(rows, [0, 1, 2, 3], pad_id, torch.device("cpu"))
    rewards, nll = model(whole["input_ids"], whole["attention_mask"], lm_labels=whole["lm_labels"])
    r_c, r_r = rewards[:4], rewards[4:]
    n_tokens = int((whole["lm_labels"][:, 1:] != -100).sum())
    loss = (-torch.nn.functional.logsigmoid(r_c - r_r - whole["margin"])).mean()
    loss = loss + center_coef * ((r_c + r_r) ** 2).mean() + lm_coef * nll / n_tokens
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    with torch.no_grad():  # the logged pair statistics
        assert stats["margin"] == pytest.approx(float((r_c - r_r).mean()), rel=1e-5)
        assert stats["reward_mean"] == pytest.approx(float((r_c + r_r).mean() / 2), rel=1e-5, abs=1e-7)
        assert stats["accuracy"] == float((r_c > r_r).float().mean())
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], _grad(p), atol=1e-6, rtol=1e-4), n
    if lm_coef or center_coef:  # the term moves the gradient
        plain = step_grads(RMLossConfig())[1]
        assert not torch.allclose(got["seqcls.model.norm.weight"], plain["seqcls.model.norm.weight"])
    else:  # the first micro-batch skipped as non-finite (on_nonfinite: skip): the logged means are the second's
        from stages import trainer
        from stages.trainer import LossGuard

        monkeypatch.setattr(trainer, "all_reduce_sum", lambda v, d: torch.as_tensor(v, dtype=torch.float64))
        monkeypatch.setenv("RLHF_FAULT", "nan-loss@1")
        guard = LossGuard("loss", 1, "skip")
        host_reads.clear()
        stats = reward.train_step(GradOnlyEngine(model, len(batches)), batches, dist, RMLossConfig(), guard)
        # reads back to the host (each a GPU sync): the step's counts, the guard's flag per micro-batch, the
        # gradient norm (ZeRO-0 here), the logged sums -- none per metric or per micro-batch
        assert sum(host_reads.values()) == 1 + len(batches) + 1 + 1, host_reads
        with torch.no_grad():
            rewards, _ = model(batches[1]["input_ids"], batches[1]["attention_mask"])
        second = -torch.nn.functional.logsigmoid(rewards[:2] - rewards[2:] - batches[1]["margin"]).mean()
        assert guard.dropped == [0] and stats["pairs"] == 4
        assert stats["loss"] == pytest.approx(second.item(), rel=1e-5)
        assert stats["accuracy"] == float((rewards[:2] > rewards[2:]).float().mean())


# --------------------------------------------------------------------------------------------- mutation-audit additions


def test_train_step_on_two_ranks_gives_the_one_rank_gradient(monkeypatch):
    """Two ranks holding the same micro-batches (the all-reduce doubles every count and sum; DeepSpeed averages
    the equal gradients): the global pair mean is the one-rank mean, so the gradient and the logged loss must be
    the same; the logged pair count doubles (8)."""
    from stages import reward
    from stages.config import RMLossConfig
    from stages.distributed import DistInfo

    model, batches, _, _ = _pair_setup()
    got, stats = {}, {}
    for world in (1, 2):
        monkeypatch.setattr(reward, "all_reduce_sum", lambda v, d, w=world: w * torch.as_tensor(v, dtype=torch.float64))
        model.zero_grad()
        dist = DistInfo(rank=0, local_rank=0, world_size=world, device=torch.device("cpu"))
        stats[world] = reward.train_step(GradOnlyEngine(model, len(batches)), batches, dist,
                                         RMLossConfig(lm_coef=0.5, center_coef=0.1))
        got[world] = {n: _grad(p) for n, p in model.named_parameters()}
    assert (stats[1]["pairs"], stats[2]["pairs"]) == (4, 8)
    assert stats[2]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-9)
    for n in got[1]:
        assert torch.allclose(got[2][n], got[1][n], atol=1e-7, rtol=1e-5), n
    assert got[1]["seqcls.model.norm.weight"].abs().sum() > 0  # (a gradient to compare)


def test_logged_lm_loss_after_a_skipped_micro_batch_is_the_kept_ones_token_mean(monkeypatch):
    """on_nonfinite: skip drops micro-batch 1 of 2: the logged lm_loss is the second micro-batch's NLL sum over
    its own trained tokens (not over both micro-batches' tokens), and the logged loss adds lm_coef times it."""
    from stages import reward, trainer
    from stages.config import RMLossConfig
    from stages.distributed import DistInfo
    from stages.trainer import LossGuard

    for module in (reward, trainer):
        monkeypatch.setattr(module, "all_reduce_sum", lambda v, d: torch.as_tensor(v, dtype=torch.float64))
    monkeypatch.setenv("RLHF_FAULT", "nan-loss@1")
    model, batches, _, _ = _pair_setup()
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    guard = LossGuard("loss", 1, "skip")
    stats = reward.train_step(GradOnlyEngine(model, len(batches)), batches, dist, RMLossConfig(lm_coef=0.5), guard)
    second = batches[1]
    with torch.no_grad():
        rewards, nll = model(second["input_ids"], second["attention_mask"], lm_labels=second["lm_labels"])
    tokens = int((second["lm_labels"][:, 1:] != -100).sum())
    assert guard.dropped == [0] and int((batches[0]["lm_labels"][:, 1:] != -100).sum()) > 0  # (the two differ)
    assert stats["lm_loss"] == pytest.approx(float(nll) / tokens, rel=1e-5)
    pair = float(-torch.nn.functional.logsigmoid(rewards[:2] - rewards[2:] - second["margin"]).mean())
    assert stats["loss"] == pytest.approx(pair + 0.5 * float(nll) / tokens, rel=1e-5)


class _FirstTokenScorer:
    """A stand-in engine for score_pairs: the reward of a row is its first token id; records each forward's
    rows and whether it ran in eval mode."""

    def __init__(self) -> None:
        self.training, self.calls = True, []

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, lm_labels: Any = None) -> tuple[torch.Tensor, None]:
        self.calls.append((ids[:, 0].tolist(), self.training))
        return ids[:, 0].double(), None

    def eval(self) -> None:
        self.training = False

    def train(self) -> None:
        self.training = True


def test_score_pairs_deals_pairs_round_robin_and_discards_the_stand_in():
    """5 pairs (chosen first token 10 + i, rejected 20 + i, margin i / 10) on 2 ranks, micro-batches of 2: rank 0
    scores pairs 0, 2, 4; rank 1 pairs 1, 3 and then a stand-in (pair 0) it discards, so both run 2 forwards;
    each returns its own rewards and margins only, and leaves the engine in training mode."""
    from stages.data import TokenizedExample
    from stages.distributed import DistInfo
    from stages.reward import score_pairs

    rows = PairRows()
    for i in range(5):
        rows.append(TokenizedExample([10 + i, 1], [-100, 1]), TokenizedExample([20 + i, 1, 1], [-100, 1, 1]), i / 10)
    expected = {0: ([10.0, 12.0, 14.0], [20.0, 22.0, 24.0], [0.0, 0.2, 0.4], [[10, 12, 20, 22], [14, 24]]),
                1: ([11.0, 13.0], [21.0, 23.0], [0.1, 0.3], [[11, 13, 21, 23], [10, 20]])}
    for rank, (chosen, rejected, margins, forwards) in expected.items():
        engine = _FirstTokenScorer()
        dist = DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        got = score_pairs(engine, rows, 2, dist, pad_id=0)
        assert got == (chosen, rejected, pytest.approx(margins)), rank
        assert engine.calls == [(f, False) for f in forwards], rank
        assert engine.training, rank


def test_reward_metrics_use_the_margins_and_count_pairs():
    """Pair 1: r+ 1, r- 0, margin 1 -> -log sigmoid(0) = log 2; pair 2: a tie, margin 0 -> log 2. Two pairs
    (not four rewards)."""
    m = reward_metrics([1.0, 2.0], [0.0, 2.0], [1.0, 0.0], prefix="eval")
    assert m["eval/loss"] == pytest.approx(math.log(2))
    assert m["eval/pairs"] == 2.0


def test_stats_record_holds_the_distribution_accuracy_pairs_split_and_step():
    """Rewards 1, 3 (chosen) and 0, 4 (rejected): mean 2, population std sqrt(2.5), min 0, max 4; accuracy 1/2
    (margin 0, which must not stand in for it); 2 pairs."""
    from stages.reward import _stats_record

    record = _stats_record(reward_metrics([1.0, 3.0], [0.0, 4.0], [0.0, 0.0], prefix="eval"), "eval", 7)
    assert record == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.5)), "min": 0.0, "max": 4.0, "accuracy": 0.5,
                      "pairs": 2, "split": "eval", "step": 7}


def test_resumed_stats_reads_the_checkpoints_reward_stats(tmp_path):
    """A resume from step 4 reads checkpoint 4's hf/reward_stats.json; a checkpoint without one, or a fresh run
    (step 0), has none."""
    import json

    from stages.checkpoint import checkpoint_name
    from stages.reward import REWARD_STATS_FILE, resumed_stats

    hf = tmp_path / checkpoint_name(4) / "hf"
    hf.mkdir(parents=True)
    (hf / REWARD_STATS_FILE).write_text(json.dumps({"mean": 0.5, "step": 4}))
    (tmp_path / checkpoint_name(6) / "hf").mkdir(parents=True)
    assert resumed_stats(tmp_path, 4) == {"mean": 0.5, "step": 4}
    assert resumed_stats(tmp_path, 6) is None and resumed_stats(tmp_path, 0) is None


def test_describe_pairs_names_each_count_in_its_place():
    """Every count of a pair data report has a distinct value here, so each must land in its own place."""
    from stages.data import DataReport
    from stages.reward import describe_pairs

    report = DataReport(examples=20, tokens=1234, identical_pairs=2, identical_after_truncation=1, duplicate_pairs=3,
                        context_cut_pairs=4, no_room_pairs=5, prompt_truncated=6, response_truncated=7,
                        prompt_repeats=8)
    assert describe_pairs("train", report) == (
        "train data: 20 pairs; 1,234 tokens; dropped 2 identical pair(s) (1 made so by max_length) and 3 duplicate(s), "
        "4 pair(s) differing before the final turn that max_length cut into (raise it), 5 pair(s) whose kept context "
        "left no room for a response (raise max_length, or lower max_prompt_length); truncated: 6 prompts (left), "
        "7 responses (right); 8 pair(s) whose chosen and rejected both begin with the prompt text (read twice: give "
        "the responses alone)" + report.notes())
    plain = DataReport(examples=20, tokens=10)
    assert describe_pairs("eval", plain) == (
        "eval data: 20 pairs; 10 tokens; dropped 0 identical pair(s) (0 made so by max_length) and 0 duplicate(s); "
        "truncated: 0 prompts (left), 0 responses (right)" + plain.notes())


def test_eval_fraction_0_holds_out_nothing(tmp_path):
    """data.eval_fraction: 0 and no data.eval: every pair trains and there is no eval split (split_holdout would
    hold out one pair even at fraction 0); at 0.1 it holds out round(0.1 x 30) = 3 of 30."""
    import json

    import yaml

    from conftest import REPO
    from rlhf_cli.config_loader import load_config
    from stages.distributed import ONE_PROCESS
    from stages.reward import load_rm_data

    tiny = REPO / "configs" / "tiny"
    model = yaml.safe_load((tiny / "sft.yaml").read_text())["model"]["from_config"]
    (tmp_path / "train.jsonl").write_text("\n".join((tiny / "data" / "rm.jsonl").read_text().splitlines()[:30]) + "\n")
    for fraction, n_eval in ((0, None), (0.1, 3)):
        cfg = load_config("train-rm", tiny / "rm.yaml", [
            f"output_dir={tmp_path / 'rm'}", "model.name_or_path=null", f"model.from_config={json.dumps(model)}",
            f"data.train={tmp_path / 'train.jsonl'}", f"data.eval_fraction={fraction}"])
        _, _, train, held, reports = load_rm_data(cfg, tmp_path / "rm", ONE_PROCESS, save=False)
        assert (len(held) if held is not None else None) == n_eval, fraction
        assert len(train) + (n_eval or 0) == 30
        assert sorted(reports) == (["train"] if n_eval is None else ["eval", "train"])


def test_the_pad_added_line_is_said_only_when_the_tokenizer_grew_and_covers_a_tokenizer_without_pad(capsys) -> None:
    from stages.reward import say_added_pad

    say_added_pad(False, True)
    say_added_pad(True, False)  # (not rank 0)
    assert capsys.readouterr().out == ""
    say_added_pad(True, True)
    assert capsys.readouterr().out == ("the tokenizer had no pad token of its own (none, or its EOS); added a distinct "
                                       "<|pad|> (embedding grown by 1)\n")
