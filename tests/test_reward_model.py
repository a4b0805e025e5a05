"""Reward-model pieces without training: the loss terms and metrics against hand-computed values, the reward read
at the last real token (left/right padding, pad == EOS), the LM head, the distinct pad token."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("lm_coef, center_coef", [(0.0, 0.0), (0.0, 0.5), (0.7, 0.0)])
def test_train_step_gradient_is_that_of_the_stated_loss(monkeypatch, host_reads, lm_coef, center_coef):
    """One rank, two micro-batches with margins: the accumulated gradient equals the gradient of
    mean_pairs[-log sigmoid(r+ - r- - m) + center_coef (r+ + r-)^2] + lm_coef * token-mean NLL(chosen),
    and each term changes it."""
    from stages import reward
    from stages.config import RMLossConfig
    from stages.data import TokenizedExample
    from stages.distributed import DistInfo

    monkeypatch.setattr(reward, "all_reduce_sum", lambda v, d: torch.as_tensor(v, dtype=torch.float64))
    tok = train_tokenizer([f"the answer to {i} is {i + 1}" for i in range(100)], vocab_size=300, min_frequency=1)
    model = build_reward_model(ModelConfig(from_config=TINY), tok, "fp32", {}, seed=0, with_lm_head=True,
                               resize=False)
    rows = PairRows()
    for i in range(4):
        c = tok(f"the answer to {i} is {i + 1}")["input_ids"] + [tok.eos_token_id]
        r = tok(f"the answer to {i} is {i + 7}")["input_ids"] + [tok.eos_token_id]
        rows.append(TokenizedExample(c, [-100] * 4 + c[4:]), TokenizedExample(r, [-100] * 4 + r[4:]), 0.3 * i)
    batches = [collate_pairs(rows, idx, tok.pad_token_id, torch.device("cpu")) for idx in ([0, 1], [2, 3])]
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def step_grads(cfg: RMLossConfig) -> tuple[dict, dict[str, torch.Tensor]]:
        model.zero_grad()
        stats = reward.train_step(GradOnlyEngine(model, len(batches)), batches, dist, cfg)
        return stats, {n: _grad(p) for n, p in model.named_parameters()}

    stats, got = step_grads(RMLossConfig(lm_coef=lm_coef, center_coef=center_coef))
    model.zero_grad()
    whole = collate_pairs(rows, [0, 1, 2, 3], tok.pad_token_id, torch.device("cpu"))
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
