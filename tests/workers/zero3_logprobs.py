"""One rank of a two-process ZeRO-3 run of the chunked log-prob path with a different response width on each rank
(as each rank's rollout stops on its own): rank 0 has 4 response tokens, rank 1 has 12, so with chunk_tokens 4
rank 1 needs 3 LM-head blocks and rank 0 one. Every head call gathers the partitioned head weight, so unequal
call counts would deadlock. Prints `RESULT <json>`: the no-grad log-probs against the full-logits reference,
and the parameters after one SGD step on the chunked loss against those after the same step on the reference
loss (both gathered in full)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from stages.distributed import setup_distributed  # noqa: E402
from stages.ppo.models import freeze  # noqa: E402
from stages.ppo.rollout import left_pad, response_logprobs  # noqa: E402

CHUNK = 4


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))


def ds_config(train: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "steps_per_print": 2**31 - 1, "zero_allow_untested_optimizer": True}
    if train:
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.5}}
    return cfg


def full_params(engine) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    dist = setup_distributed()
    ids, mask = left_pad([[5, 9, 12], [21, 4]], 0, dist.device)
    width = 2 if dist.rank == 0 else 6
    gen = torch.Generator().manual_seed(100 + dist.rank)
    resp = torch.randint(2, 64, (2, width), generator=gen)
    full, full_mask = torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1)
    frozen = freeze(model(), ds_config(False), dist.device)
    with torch.no_grad():
        fast, _ = response_logprobs(frozen, full, full_mask, ids.shape[1], resp, chunk_tokens=CHUNK)
        ref, _ = response_logprobs(frozen, full, full_mask, ids.shape[1], resp, chunk_tokens=0)
    after = {}
    for chunk in (CHUNK, 0):
        net = model()
        engine = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config(True))[0]
        logp, ent = response_logprobs(engine, full, full_mask, ids.shape[1], resp, True, chunk_tokens=chunk)
        engine.backward(-(logp.sum() + 0.1 * ent.sum()))
        engine.step()
        after[chunk] = full_params(engine)
    step_diff = max(float((after[CHUNK][n] - after[0][n]).abs().max()) for n in after[0])
    moved = max(float((after[0][n] - p.detach()).abs().max()) for n, p in model().named_parameters())
    print("RESULT " + json.dumps({"rank": dist.rank, "logprob_diff": float((fast - ref).abs().max()),
                                  "step_diff": step_diff, "moved": moved}), flush=True)


if __name__ == "__main__":
    main()
