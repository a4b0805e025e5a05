"""`rlhf ppo`: PPO with the PPO-max tricks (PPO-MAX.md). One iteration, top to bottom in `run`:

    1. rollout   sample responses for this rank's prompts (policy; ZeRO-3: a copy gathered once per rollout)
    2. score     old log-probs (policy), reference log-probs, values (critic), raw scores (reward model)
    3. rewards   running statistics merged across ranks -> scaling / normalization -> clipping
    4. tokens    R_t = -beta KL_t, transformed score on the last response token
    5. GAE       advantages and returns
    6. update    ppo_epochs passes of mini-batches: PPO-clip policy loss (+ entropy bonus, + PTX), clipped value
                 loss; the critic alone during the first critic_pretrain_steps iterations
    then metrics, the collapse monitor, samples, validation (best/), checkpoints.

Losses are token-level means over a mini-batch's response tokens on all ranks (micro-batch sums scaled by
ranks x accumulation steps / global token count, as DeepSpeed averages over both).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from rich.markup import escape
from torch.profiler import record_function

from stages import faults, stop
from stages.checkpoint import (
    describe_failure,
    load_latest_checkpoint,
    nonfinite_parameter,
    publish_final,
    read_recorded,
    replace_dir,
    save_checkpoint,
    save_hf,
)
from stages.config import PPOConfig
from stages.data import (BadRowLog, DataReport, count_in_train, cut_warning, load_conversations, skip_warning,
                         special_note, tokenize_conversations, unread_warning)
from stages.distributed import ONE_PROCESS, DistInfo, all_reduce_sum, barrier, gather_floats, seed_everything
from stages.engine import build_deepspeed_config, initialize_engine
from stages.errors import (CheckpointError, DataError, NonFinite, RlhfError, is_out_of_memory, resume_with,
                           while_doing)
from stages.gold import check_gold_prompts, gold_scores
from stages.lm import collate, lm_forward, shifted_nll_sum, trained_token_count
from stages.metrics import MetricsLogger, TrainProgress, keep_rows_upto, print_summary, read_metrics, say
from stages.model_paths import resolve_model_dir
from stages.models import default_template_caution, prepare_tokenizer
from stages.perf import StepProfiler, clock, flop_shape, peak_memory_gib, reset_peak_memory, train_flops, unwrap
from stages.ppo.ending import RewardEnding, ending_for
from stages.ppo.experience import GlobalMeans, advantages_for, global_moments, merge_across_ranks, transform_scores
from stages.ppo.models import (
    GenerationCopy,
    build_critic,
    build_policy,
    build_reference,
    build_reward,
    check_tokenizers,
    engine_train_config,
    freeze,
    frozen_ds_config,
    saved_stop_ids,
    stop_token_ids,
)
from stages.ppo.monitor import collapse_reasons
from stages.ppo.presets import PRESETS
from stages.ppo.prompts import Prompts, held_out_sha256, load_prompts, ptx_data_config, ptx_wording
from stages.ppo.rollout import (
    Rollout,
    left_pad,
    logprob_temperature,
    raw_scores,
    repetition_rate,
    response_lists,
    response_logprobs,
    sample,
)
from stages.ppo.tricks import (
    RunningMoments,
    kl_k1,
    kl_k3,
    masked,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
    whiten,
)
from stages.rendering import check_rendering, read_rendering, rendering_record
from stages.runtime import atomic_write_text
from stages.trainer import (
    EpochSampler,
    LossGuard,
    check_finite,
    check_resume_point,
    due,
    end_stopped,
    fp16_skipped_steps,
    kept,
    open_run,
    optimizer_step,
    say_report,
    split_holdout,
    warn_if_auto_tokenizer_differs,
    warn_unused_settings,
)


# --------------------------------------------------------------------------------------------- data
def load_ppo_data(cfg: PPOConfig, out: Path, dist: DistInfo, tokenizer: Any, save: bool = True) -> dict[str, Any]:
    """Train and validation prompts (token ids) and, with ptx_coef > 0, the tokenized PTX rows; what was read,
    cut and skipped (by reason) printed, and saved as out/data_report.json unless `save` is False."""
    data = cfg.data
    log = BadRowLog()
    styles: set[str] = set()

    def split_report(prompts: Prompts, found: BadRowLog) -> dict[str, Any]:
        return {"rows_read": len(prompts.ids), "cut": prompts.cut, "special_as_text": prompts.special_as_text,
                "skipped_rows": found.total, "skipped_by_reason": dict(found.reasons), "unread_columns": found.unread}

    rows: list[tuple[int, int]] = []
    read = load_prompts(data.train, data, tokenizer, log, styles, rows=rows)
    train, cut, as_text = read
    report: dict[str, Any] = {"train": split_report(read, log)}
    held = None
    if data.eval is not None:
        eval_log = BadRowLog()
        held_read = load_prompts(data.eval, data, tokenizer, eval_log, styles)
        held, as_text = held_read.ids, as_text + held_read.special_as_text
        report["eval"] = split_report(held_read, eval_log)
    elif data.eval_fraction > 0:
        train, held = split_holdout(train, data.eval_fraction, cfg.seed)
        report["eval"] = {"held_out_of_train": len(held),
                          "held_out_sha256": held_out_sha256(rows, data.eval_fraction, cfg.seed)}
    report["train"]["prompts"] = len(train)
    seen = ""
    if held is not None:
        report["eval"]["prompts"] = len(held)
        report["eval"]["in_train"] = count_in_train((hash(tuple(p)) for p in train), (hash(tuple(p)) for p in held))
        seen = f" ({report['eval']['in_train']} also among the train prompts)" if report["eval"]["in_train"] else ""
    logs = {"train": log} | ({"eval": eval_log} if data.eval is not None else {})
    skipped = "".join(f"; {split}: {found.total} bad row(s){found.summary()}" for split, found in logs.items()
                      if found.total)
    cut_where = " (before the validation share was held out)" if data.eval is None and held else ""
    say(dist.is_main, f"prompts: {len(train)} train, {len(held or [])} validation{seen}; {cut} of data.train's prompts cut to "
                      f"{data.max_prompt_length} tokens{cut_where}{special_note(as_text)}{skipped}")
    warning = cut_warning({"prompts": cut}, len(read.ids), "prompts of data.train",  # (their left part: the question
                          f"data.max_prompt_length ({data.max_prompt_length} tokens) from the left")  # may be gone)
    defaulted = default_template_caution(tokenizer, styles)
    warnings = [warning, defaulted] + [
        f"data.{split}: {w}" for split, found in logs.items()
        for w in (skip_warning(found.reasons, found.total + report[split]["rows_read"]), unread_warning(found.unread))
        if w]
    for warning in filter(None, warnings):
        say(dist.is_main, f"[yellow]warning: {escape(warning)}[/]")
    ptx = None
    if cfg.ppo.ptx_coef > 0 and data.ptx is not None:
        sft, files = ptx_data_config(data), data.ptx.paths()
        ptx_report, ptx_log = DataReport(), BadRowLog()
        try:
            ptx = tokenize_conversations(load_conversations(data.ptx, sft, ptx_log), tokenizer, sft, ptx_report)
        except DataError as exc:  # (its rows are read as SFT data: said in the PPO config's keys)
            raise DataError(ptx_wording(str(exc), files)) from None
        ptx_report.count_skipped(ptx_log)
        if not defaulted:  # (else said above for the prompts)
            ptx_report.cautions += filter(None, [default_template_caution(tokenizer, ptx_report.styles)])
        report["ptx"] = asdict(ptx_report)
        say_report(dist.is_main, "PTX", ptx_report, lambda split, r: f"{split} data: {r.examples} examples, "
                   f"{r.trained_tokens:,} trained tokens{r.notes()}", keys=lambda text: ptx_wording(text, files))
    elif data.ptx is not None:
        say(dist.is_main, "[yellow]warning: data.ptx is given but ppo.ptx_coef is 0: the PTX data is not used[/]")
    if save and dist.is_main:
        atomic_write_text(out / "data_report.json", json.dumps(report, indent=2) + "\n")
    if data.gold_reward:
        warn = lambda text: say(dist.is_main, f"[yellow]{text}[/]")  # noqa: E731
        check_gold_prompts(data.gold_reward, tokenizer, train, f"data.train ({data.train.path})", warn)
        if held:
            check_gold_prompts(data.gold_reward, tokenizer, held, "the validation prompts", warn)
    return {"train": train, "eval": held, "ptx": ptx, "styles": styles}


def check_prompt_rendering(cfg: PPOConfig, styles: set[str], tokenizer: Any, dist: DistInfo) -> None:
    """data.rendering_check of the prompts against the policy (SFT) and the reward model (stages/rendering.py)."""
    models = {what: resolve_model_dir(m.name_or_path) for what, m in
              (("the policy (SFT)", cfg.model), ("the reward model", cfg.reward_model)) if m.name_or_path}
    check_rendering(cfg.data.rendering_check, styles, tokenizer, models,
                    lambda text: say(dist.is_main, f"[yellow]{text}[/]"),
                    content_special_tokens=cfg.data.content_special_tokens)


def describe_tricks(cfg: PPOConfig) -> str:
    """One line per preset-controlled key: its value, and the preset's where they differ."""
    preset = PRESETS[cfg.ppo.preset]
    lines = [f"PPO tricks (preset {cfg.ppo.preset}; * = differs from the preset):"]
    for key, default in preset.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        mark = "*" if value != default else " "
        lines.append(f"  {mark} {key:<30} {value}" + (f"   (preset: {default})" if mark == "*" else ""))
    ppo = cfg.ppo
    if ppo.reward_clip > 0 and not (ppo.reward_norm or ppo.reward_scaling):  # (--ppo-max --no-reward-norm, say)
        lines.append(f"  note: ppo.reward_clip {ppo.reward_clip} clips the raw reward-model scores (reward_norm and "
                     "reward_scaling are off): size it against the RM's score spread (reward_stats.json)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- models
def build_models(cfg: PPOConfig, dist: DistInfo, tok: Any, rm_tok: Any, steps: dict[str, int]) -> dict[str, Any]:
    """policy and critic engines, frozen reference and reward model, the model used for sampling."""
    on_gpu = dist.device.type == "cuda"
    frozen_cfg = frozen_ds_config(cfg, dist.world_size, on_gpu)
    models: dict[str, Any] = {}
    models["reference"] = freeze(build_reference(cfg, tok, frozen_cfg or {}), frozen_cfg, dist.device)
    rm = build_reward(cfg.reward_model, rm_tok, cfg.deepspeed.precision, frozen_cfg or {}, cfg.seed)
    models["reward"] = freeze(rm, frozen_cfg, dist.device)
    for name, lr, total in (("policy", cfg.train.policy_lr, steps["policy"]), ("critic", cfg.train.critic_lr, steps["critic"])):
        tc = engine_train_config(cfg, lr)
        ds = build_deepspeed_config(tc, cfg.deepspeed, dist.world_size, on_gpu)
        model = build_policy(cfg, tok, ds) if name == "policy" else build_critic(cfg, tok, rm_tok, ds)
        models[name] = initialize_engine(model, ds, tc, max(total, 1))
    module = models["policy"].module
    models["sampler"] = GenerationCopy(module, dist.device) if cfg.deepspeed.zero_stage == 3 else None
    return models


def sampling_model(models: dict[str, Any]) -> torch.nn.Module:
    copy: GenerationCopy | None = models["sampler"]
    return copy.refresh(models["policy"].module) if copy is not None else models["policy"].module


# --------------------------------------------------------------------------------------------- score
def scoring_rows(cfg: PPOConfig) -> int:
    """Rows per no-grad forward when scoring rollouts (train.forward_batch_size, else the micro-batch size)."""
    return cfg.train.forward_batch_size or cfg.train.micro_batch_size


@torch.no_grad()
def score_rollout(cfg: PPOConfig, models: dict[str, Any], rollout: Rollout,
                  ending: RewardEnding, for_update: bool = True) -> dict[str, torch.Tensor]:
    """Step 2: per response token old log-prob, reference log-prob, and (`for_update`; validation needs neither)
    entropy and value; per response the raw score (read where the RM's training data ends a turn, `ending`; see
    raw_scores)."""
    ids, mask = rollout.sequences()
    p, chunk = rollout.prompt_width, scoring_rows(cfg)
    lp_args = (cfg.train.logprob_chunk, logprob_temperature(cfg.generation), rollout.vocab_size, rollout.held)
    keys = ("logp", "ref_logp", "raw") + (("entropy", "values") if for_update else ())
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for s in range(0, ids.shape[0], chunk):
        i, m, resp = ids[s:s + chunk], mask[s:s + chunk], rollout.response[s:s + chunk]
        logp, ent = response_logprobs(models["policy"], i, m, p, resp, for_update, *lp_args)
        ref_logp, _ = response_logprobs(models["reference"], i, m, p, resp, False, *lp_args)
        parts["logp"].append(logp)
        parts["ref_logp"].append(ref_logp)
        if for_update:
            parts["entropy"].append(ent)
            parts["values"].append(models["critic"](i, m)[:, p - 1:-1])
        parts["raw"].append(raw_scores(cfg.generation, models["reward"], i, m, rollout.truncated[s:s + chunk], ending))
    return {k: torch.cat(v) for k, v in parts.items()}


SCORED = {"raw": "reward-model score", "logp": "policy log-prob", "ref_logp": "reference log-prob",
          "values": "critic value"}


def nonfinite_counts(exp: dict[str, torch.Tensor], response_mask: torch.Tensor) -> torch.Tensor:
    """How many NaN/inf values each scored quantity (SCORED, in order) has on this rank: per response token,
    per rollout for the raw score; a float64 tensor on the scores' device (nothing read back to the host)."""
    on = response_mask.bool()
    bad = [~torch.isfinite(exp[key]) & (True if key == "raw" else on) for key in SCORED]
    return torch.stack([b.sum() for b in bad]).double()


def nonfinite_names(counts: list[float]) -> list[str]:
    """SCORED's names with their counts, for those with a NaN/inf."""
    return [f"{name} ({int(c)} value(s))" for name, c in zip(SCORED.values(), counts) if c]


def make_experience(cfg: PPOConfig, dist: DistInfo, models: dict[str, Any], rollout: Rollout,
                    moments: RunningMoments, ending: RewardEnding, iteration: int) -> dict[str, torch.Tensor] | None:
    """Steps 2-5: score the rollout; add its raw scores to the running statistics (all ranks, this batch
    included) and transform them; token rewards with the KL penalty; GAE advantages and returns.

    A NaN/inf score, log-prob or value on any rank (checked before the running statistics see it) stops the
    run (train.on_nonfinite: stop) or returns None (skip: the iteration makes no update)."""
    exp = score_rollout(cfg, models, rollout, ending)
    exp["raw"] = faults.maybe_poison("nan-reward", iteration, exp["raw"])
    local = nonfinite_counts(exp, rollout.response_mask)
    mine, anywhere = torch.stack([local, all_reduce_sum(local, dist.device)]).tolist()  # one host read
    if sum(anywhere):
        if cfg.train.on_nonfinite == "skip":
            return None
        bad = nonfinite_names(mine)
        found = f"rank {dist.rank}: {', '.join(bad)}" if bad else "on another rank"
        raise NonFinite(f"non-finite values in the rollout of iteration {iteration} ({found}); stopped before "
                        "the update and before the running reward statistics saw them, nothing saved (continuing "
                        f"{resume_with()} starts from the newest complete checkpoint, if there is one; or set "
                        "train.on_nonfinite: skip)")
    merge_across_ranks(moments, exp["raw"], dist.device)
    exp["score"] = transform_scores(exp["raw"], moments, cfg.ppo)
    mask = rollout.response_mask.float()
    adv = advantages_for(exp["score"], exp["logp"], exp["ref_logp"], exp["values"], mask, cfg.ppo)
    return exp | {"kl": adv.kl, "rewards": adv.rewards, "advantages": adv.advantages, "returns": adv.returns}


# --------------------------------------------------------------------------------------------- update
def chunks(items: Any, size: int) -> list[Any]:
    """Consecutive slices of at most `size` of a list or a 1-D tensor (views of the tensor)."""
    return [items[s:s + size] for s in range(0, len(items), size)]


def update(
    cfg: PPOConfig, dist: DistInfo, models: dict[str, Any], rollout: Rollout, exp: dict[str, torch.Tensor],
    iteration: int, critic_only: bool, ptx: Any, ptx_sampler: EpochSampler | None, state: dict[str, Any],
    pad_id: int,
) -> dict[str, float]:
    """Step 6: ppo_epochs passes over this rank's rollouts in mini-batches (the same shuffled order on a resumed
    run: the generator is seeded by iteration). Returns the update's global metrics ("skipped": micro-batch
    losses dropped as non-finite, with train.on_nonfinite: skip)."""
    ppo, t = cfg.ppo, cfg.train
    policy, critic = models["policy"], models["critic"]
    ids, mask = rollout.sequences()
    p = rollout.prompt_width
    resp_mask = rollout.response_mask.float()
    k = dist.world_size * (t.mini_batch_size // t.micro_batch_size)
    stats = GlobalMeans()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    norms: dict[str, list[float | None]] = {"policy": [], "critic": []}
    seconds = {"policy": 0.0, "critic": 0.0}
    guards = {name: LossGuard(f"{name} loss", iteration + 1, t.on_nonfinite) for name in ("policy", "critic")}
    pending: list[list[tuple[str, Any, Any]]] = []  # each micro-batch's metric contributions, in the current step

    def note(name: str, value: torch.Tensor, count: torch.Tensor) -> None:
        """A micro-batch's metric contribution, kept on the device (no host read until the update's reduce)."""
        pending[-1].append((name, value.detach(), count))

    def step(engine: Any, micro: list[torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor],
             guard: LossGuard) -> float | None:
        """optimizer_step; then the metrics of its micro-batches, but those of one skipped as non-finite
        (train.on_nonfinite: skip; the same on every rank, so GlobalMeans' names stay in step)."""
        pending.clear()

        def each(rows: torch.Tensor) -> torch.Tensor:
            pending.append([])
            return loss_of(rows)

        start = len(guard.dropped)
        norm = optimizer_step(engine, micro, each, guard)
        for items in kept(pending, guard, start):
            for item in items:
                stats.add(*item)
        return norm

    for _ in range(ppo.ppo_epochs):
        # the shuffled rows, copied to the device once per epoch: its slices index the rollout there (a Python
        # list as an index is copied over, blocking, at every use)
        order = torch.randperm(ids.shape[0], generator=gen).to(ids.device)
        for mb in chunks(order, t.mini_batch_size):
            micro = chunks(mb, t.micro_batch_size)
            # the divisors stay tensors (no host read); float32, as the losses, which a float64 0-d divisor
            # would promote to float64
            n_tok = all_reduce_sum(resp_mask[mb].sum().reshape(1), dist.device)[0].float()
            adv = exp["advantages"].clone()
            if ppo.adv_norm:
                mean, var = global_moments(adv[mb], resp_mask[mb], dist.device)
                adv[mb] = whiten(adv[mb], resp_mask[mb], mean=mean, var=var)
            if ppo.adv_clip > 0:
                adv = adv.clamp(-ppo.adv_clip, ppo.adv_clip)
            ptx_batches: list[dict[str, torch.Tensor]] = []
            ptx_counts: list[torch.Tensor] = []
            n_ptx: torch.Tensor | float = 1.0
            if not critic_only and ppo.ptx_coef > 0 and ptx is not None and ptx_sampler is not None:
                for _ in micro:
                    rows = ptx_sampler.indices(state["ptx_step"])
                    state["ptx_step"] += 1
                    mine = rows[dist.rank * t.micro_batch_size:(dist.rank + 1) * t.micro_batch_size]
                    ptx_batches.append(collate([ptx[j] for j in mine], pad_id, dist.device))
                ptx_counts = [trained_token_count(b["labels"]) for b in ptx_batches]
                n_ptx = all_reduce_sum(torch.stack(ptx_counts), dist.device).sum().clamp(min=1.0).float()

            def policy_micro(rows: torch.Tensor) -> torch.Tensor:
                m = resp_mask[rows]
                logp, ent = response_logprobs(policy, ids[rows], mask[rows], p, rollout.response[rows],
                                              ppo.entropy_coef > 0, t.logprob_chunk,
                                              logprob_temperature(cfg.generation), rollout.vocab_size, rollout.held)
                base = exp["ref_logp"][rows] if ppo.ref_importance_sampling else exp["logp"][rows]
                pl, clipfrac = policy_loss(logp, base, adv[rows], m, ppo.policy_clip)
                loss = pl
                n = m.sum()
                if ent is not None:
                    ent_mean = masked_mean(ent, m)
                    loss = loss - ppo.entropy_coef * ent_mean
                    note("loss/entropy", ent_mean * n, n)
                total = loss * n * k / n_tok
                with torch.no_grad():
                    diff = (logp - exp["logp"][rows]).double()
                    moved = torch.expm1(diff)  # ratio - 1, in float64: E[r^2] - E[r]^2 of r near 1 cancels in float32
                    note("loss/policy", pl * n, n)
                    note("policy/clipfrac", clipfrac * n, n)
                    note("policy/approxkl", 0.5 * masked_sum(diff**2, m), n)
                    note("policy/ratio", masked_sum(moved, m), n)  # (the mean of ratio - 1 until the reduce)
                    note("policy/ratio_sq", masked_sum(moved**2, m), n)
                if ptx_batches:
                    i = len(pending) - 1  # this micro-batch's place in the step (`each` opened its entry)
                    batch = ptx_batches[i]
                    nll = shifted_nll_sum(lm_forward(policy, batch), batch["labels"])
                    total = total + ppo.ptx_coef * nll * k / n_ptx
                    note("loss/ptx", nll, ptx_counts[i])
                return total

            def critic_micro(rows: torch.Tensor) -> torch.Tensor:
                m = resp_mask[rows]
                values = critic(ids[rows], mask[rows])[:, p - 1:-1]
                vl, vclip = value_loss(values, exp["values"][rows], exp["returns"][rows], m, ppo.value_clip or None)
                n = m.sum()
                note("loss/value", vl * n, n)
                note("val/clipfrac", vclip * n, n)
                return vl * n * k / n_tok

            if not critic_only:
                t0 = clock(dist.device)
                with record_function("rlhf.update.policy"):
                    norms["policy"].append(step(policy, micro, policy_micro, guards["policy"]))
                seconds["policy"] += clock(dist.device) - t0
            t0 = clock(dist.device)
            with record_function("rlhf.update.critic"):
                norms["critic"].append(step(critic, micro, critic_micro, guards["critic"]))
            seconds["critic"] += clock(dist.device) - t0
    out = stats.reduce(dist.device) | {f"perf/{k}_update_s": v for k, v in seconds.items()}
    out["skipped"] = float(sum(g.skipped for g in guards.values()))
    if "policy/ratio" in out:  # Var(r) = E[(r-1)^2] - E[r-1]^2
        out["policy/ratio_var"] = out.pop("policy/ratio_sq") - out["policy/ratio"] ** 2
        out["policy/ratio"] += 1.0
    for name, found in norms.items():
        known = [v for v in found if v is not None]  # (None: unknown, or a step fp16's loss scaler skipped)
        if known:
            out[f"grad_norm/{name}"] = sum(known) / len(known)
    for name in ("policy", "critic"):
        overflows = fp16_skipped_steps(models[name])
        if overflows is not None:
            out[f"train/fp16_skipped_steps_{name}"] = overflows
    return out


# --------------------------------------------------------------------------------------------- metrics
def rollout_metrics(
    cfg: PPOConfig, dist: DistInfo, rollout: Rollout, exp: dict[str, torch.Tensor], stop_ids: list[int]
) -> dict[str, float]:
    """Global per-iteration metrics of the experience (names follow TRL's where one exists)."""
    g = GlobalMeans()
    m = rollout.response_mask.float()
    rows = float(m.shape[0])
    tokens = m.sum(1)
    k1, k3 = masked(kl_k1(exp["logp"], exp["ref_logp"]), m), masked(kl_k3(exp["logp"], exp["ref_logp"]), m)
    g.add("objective/scores", exp["raw"].sum(), rows)
    g.add("objective/scores_sq", (exp["raw"].double() ** 2).sum(), rows)
    g.add("objective/scores_transformed", exp["score"].sum(), rows)
    g.add("objective/scores_transformed_sq", (exp["score"].double() ** 2).sum(), rows)
    g.add("objective/kl", k1.sum(), rows)
    g.add("objective/kl_k3", k3.sum(), rows)
    g.add("objective/kl_per_token", k1.sum(), m.sum())
    g.add("objective/kl_k3_per_token", k3.sum(), m.sum())
    g.add("objective/non_score_reward", (-cfg.ppo.kl_coef * exp["kl"]).sum(), rows)
    g.add("objective/entropy", masked_sum(exp["entropy"], m), m.sum())
    g.add("rollout/response_length", tokens.sum(), rows)
    g.add("rollout/cap_share", rollout.truncated.float().sum(), rows)
    g.add("rollout/nll_policy", -masked_sum(exp["logp"], m), m.sum())
    g.add("rollout/nll_reference", -masked_sum(exp["ref_logp"], m), m.sum())
    reps = [repetition_rate(r, cfg.monitor.ngram) for r in response_lists(rollout, stop_ids)]
    g.add("rollout/repetition", sum(reps), rows)
    g.add("val/values", masked_sum(exp["values"], m), m.sum())
    g.add("val/returns", masked_sum(exp["returns"], m), m.sum())
    g.add("val/advantages", masked_sum(exp["advantages"], m), m.sum())
    out = g.reduce(dist.device)
    for name in ("objective/scores", "objective/scores_transformed"):  # std = sqrt(E[x^2] - E[x]^2), across ranks
        out[f"{name}_std"] = math.sqrt(max(out.pop(f"{name}_sq") - out[name] ** 2, 0.0))
    out["objective/rlhf_reward"] = out["objective/scores_transformed"] + out["objective/non_score_reward"]
    out["rollout/perplexity"] = math.exp(min(out["rollout/nll_policy"], 50.0))
    out["rollout/ref_perplexity"] = math.exp(min(out["rollout/nll_reference"], 50.0))
    # what MOSS-RLHF logs as "perplexity": exp(mean NLL / mean response length) -- not a perplexity
    out["rollout/moss_logged_ppl"] = math.exp(out["rollout/nll_policy"] / max(out["rollout/response_length"], 1.0))
    _, var_err = global_moments(exp["returns"] - exp["values"], m, dist.device)
    _, var_ret = global_moments(exp["returns"], m, dist.device)
    out["val/explained_variance"] = 1.0 - var_err / max(var_ret, 1e-12)
    return out


def rank_spread(values: list[float]) -> float:
    """Largest difference between ranks of any of `values` (0 when every rank holds the same numbers)."""
    every = gather_floats(values)
    per_rank = [every[i:i + len(values)] for i in range(0, len(every), len(values))]
    return max(max(col) - min(col) for col in zip(*per_rank))


def show_samples(cfg: PPOConfig, out: Path, iteration: int, tokenizer: Any, prompts: list[list[int]],
                 responses: list[list[int]], scores: list[float], gold: list[float] | None = None) -> None:
    """A rich table prompt | response | reward (| gold) of this rank's first samples; all of them go to
    samples.jsonl, with the iteration as logged (metrics.jsonl, checkpoint-N) and `policy_iteration` = iteration
    - ppo.critic_pretrain_steps (<= 0 during critic pre-training: what `rlhf report` plots over)."""
    from rich.table import Table

    from stages.metrics import _CONSOLE

    policy_iteration = iteration - cfg.ppo.critic_pretrain_steps
    which = f" (policy iteration {policy_iteration})" if cfg.ppo.critic_pretrain_steps else ""
    table = Table(title=f"samples at iteration {iteration}{which}", show_lines=True)
    for col in ("prompt", "response", "reward") + (("gold",) if gold is not None else ()):
        table.add_column(col, overflow="fold")
    with (out / "samples.jsonl").open("a", encoding="utf-8") as fh:
        for i, (pr, resp, score) in enumerate(zip(prompts, responses, scores)):
            p_text = tokenizer.decode(pr, skip_special_tokens=False)
            r_text = tokenizer.decode(resp, skip_special_tokens=False)
            row = {"iteration": iteration, "policy_iteration": policy_iteration, "prompt": p_text,
                   "response": r_text, "score": score}
            extra = {"gold": gold[i]} if gold is not None else {}
            fh.write(json.dumps(row | extra) + "\n")
            if i < cfg.train.samples_shown:
                table.add_row(p_text[-200:], r_text[:300], f"{score:.3f}", *(f"{v:.3f}" for v in extra.values()))
    _CONSOLE.print(table)


# --------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(cfg: PPOConfig, dist: DistInfo, models: dict[str, Any], prompts: list[list[int]], tokenizer: Any,
             stop_ids: list[int], ending: RewardEnding) -> dict[str, float]:
    """Mean raw reward (and gold reward), KL from the reference (k1 summed over each response, as objective/kl)
    and length of responses to the held-out prompts, sampled with a fixed seed (the same
    random stream at every validation; the training random state is left untouched). Every rank runs the same
    number of batches (ZeRO-3 needs that), of train.rollout_batch_size prompts; with the static KV cache each
    batch is full, the training rollout's shape (a smaller last batch would allocate a second cache, and compile
    and record another decoding step, kept for the rest of the run): short ranks and short last batches run
    stand-in prompts not counted."""
    mine = list(range(dist.rank, len(prompts), dist.world_size))
    batch = cfg.train.rollout_batch_size
    per_rank = math.ceil(len(prompts) / dist.world_size)
    if cfg.generation.cache == "static":
        per_rank = math.ceil(per_rank / batch) * batch
    real = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    g = GlobalMeans()
    model = sampling_model(models)
    pad_id, vocab = tokenizer.pad_token_id, len(tokenizer)
    devices = [dist.device.index or 0] if dist.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919 * (dist.rank + 1))
        for s in range(0, per_rank, batch):
            rows = mine[s:s + batch]
            keep = torch.tensor(real[s:s + batch], device=dist.device)
            p_ids, p_mask = left_pad([prompts[i] for i in rows], pad_id, dist.device)
            rollout = sample(model, p_ids, p_mask, cfg.generation, stop_ids, pad_id, vocab,
                            prompt_capacity=cfg.data.max_prompt_length)
            scored = score_rollout(cfg, models, rollout, ending, for_update=False)  # (training's forward batches)
            raw = scored["raw"]
            kl = masked(kl_k1(scored["logp"], scored["ref_logp"]), rollout.response_mask.float()).sum(1)  # per response
            # (masked_sum, not x * keep: a NaN on a filler row, which NaN x 0 keeps, is dropped)
            g.add("eval/reward", masked_sum(raw, keep), keep.sum())
            g.add("eval/kl", masked_sum(kl, keep), keep.sum())
            g.add("eval/response_length", masked_sum(rollout.response_mask.sum(1), keep), keep.sum())
            g.add("eval/cap_share", masked_sum(rollout.truncated.float(), keep), keep.sum())
            if cfg.data.gold_reward:
                gold = gold_scores(cfg.data.gold_reward, tokenizer, [prompts[i] for i in rows],
                                   response_lists(rollout, stop_ids))
                g.add("eval/gold", masked_sum(torch.tensor(gold, device=dist.device), keep), keep.sum())
    return g.reduce(dist.device)


def beats_best(reward: float, best: float | None, critic_only: bool) -> bool:
    """Whether a validation reward makes a new best/: finite, above the best so far (any finite reward when there
    is none), and not during the critic-only iterations. A NaN never does: taken as best it would stay best for
    good, since nothing compares above it."""
    return not critic_only and math.isfinite(reward) and (best is None or reward > best)


def resumed_best(out: Path, start: int, best: float | None) -> tuple[float | None, int | None]:
    """The best validation reward a run resumed at iteration `start` compares with: its checkpoint's `best`, or
    the reward of a best/ the interrupted run wrote after that checkpoint (its rlhf_checkpoint.json) when higher,
    so that a resumed run that does not repeat the interrupted one exactly (on a GPU) replaces that best/ only
    with a better policy. (On a CPU it repeats it: the same reward again, not better, best/ kept as it is, and
    its `best` event logged again: metrics.jsonl lost it with the rows after the checkpoint.) Also returns the
    iteration of that best/ (None when the checkpoint's best stands)."""
    record = read_recorded(out / "best" / "rlhf_checkpoint.json")
    if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
        return best, None
    reward = record.get("eval_reward")
    if record["iteration"] > start and isinstance(reward, (int, float)) and beats_best(reward, best, False):
        return float(reward), record["iteration"]
    return best, None


def save_best(models: dict[str, Any], tokenizer: Any, out: Path, dist: DistInfo, meta: dict[str, Any]) -> None:
    """The policy as out/best (HF causal LM), replaced atomically."""
    tmp, best = out / ".tmp-best", out / "best"
    bad = nonfinite_parameter(models["policy"].module)
    if all_reduce_sum([float(bad is not None)], dist.device)[0]:
        raise CheckpointError(f"refusing to write {best}: non-finite policy weights ({bad or 'on another rank'})")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        save_hf(models["policy"].module, tokenizer, tmp, dist, meta)
        if dist.is_main:
            replace_dir(tmp, best)
    except Exception as exc:  # noqa: BLE001 - a failed write (OSError, or torch/safetensors wrapping one)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_memory(exc):  # (ZeRO-3 gathers the policy to save it): the CLI says what fits
            raise while_doing(exc, f"writing {best}")
        raise CheckpointError(f"could not write {best}: {describe_failure(exc)}; the previous best/ (if any) "
                              "is unchanged") from exc
    barrier()


def load_inputs(cfg: PPOConfig, out: Path, dist: DistInfo, save: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """(policy tokenizer, RM tokenizer, `load_ppo_data`'s data): everything the run reads before it builds a
    model, checked as it is read (the two tokenizers against each other, the prompts' rendering against the
    SFT and RM records). `save=False` writes nothing (see `prepare_tokenizer`)."""
    tokenizer = prepare_tokenizer(cfg.model, out, dist, lambda: iter(()), cfg.data.chat_template, save)
    rm_tok = prepare_tokenizer(cfg.reward_model, out, dist, lambda: iter(()), None, save)
    check_tokenizers(tokenizer, rm_tok, cfg.reward_model.name_or_path or "")
    data = load_ppo_data(cfg, out, dist, tokenizer, save)
    check_prompt_rendering(cfg, data["styles"], tokenizer, dist)
    return tokenizer, rm_tok, data


def rm_ending(cfg: PPOConfig, tokenizer: Any, stop_ids: list[int], styles: set[str], enabled: bool) -> RewardEnding:
    """`ending_for` the config's reward model (data.rm_add_eos, else its record), its warnings and line printed
    when `enabled` (rank 0)."""
    rm_path = cfg.reward_model.name_or_path
    return ending_for(resolve_model_dir(rm_path) if rm_path else None, cfg.data.rm_add_eos, tokenizer, stop_ids,
                      styles, lambda text: say(enabled, f"[yellow]{text}[/]"), lambda line: say(enabled, line))


def data_samplers(cfg: PPOConfig, data: dict[str, Any], world_size: int) -> tuple[EpochSampler, EpochSampler | None]:
    """The prompt sampler (a rollout batch of rollout_batch_size prompts per rank each iteration) and, with PTX
    rows, theirs (one micro-batch per rank per update); too few rows for one such batch is an error."""
    t = cfg.train
    prompts = EpochSampler(len(data["train"]), t.rollout_batch_size * world_size, cfg.seed)
    if prompts.steps_per_epoch == 0:
        raise DataError(f"{len(data['train'])} training prompts are fewer than one rollout batch "
                        f"({t.rollout_batch_size} x {world_size} ranks)")
    ptx = None
    if data["ptx"] is not None:
        ptx = EpochSampler(len(data["ptx"]), t.micro_batch_size * world_size, cfg.seed + 1)
        if ptx.steps_per_epoch == 0:
            raise DataError(f"data.ptx has {len(data['ptx'])} rows, fewer than one micro-batch on every rank")
    return prompts, ptx


def check_data(cfg: PPOConfig, world_size: int) -> None:
    """`rlhf ppo --check-data`: load both tokenizers and every prompt (and PTX row) as the run would, with the
    run's checks (tokenizers agree, rendering matches the SFT and RM records, gold-reward prompts, enough prompts
    for one rollout batch on `world_size` ranks, how the RM reads a response's ending: `ending_for`, with the
    policy's stop tokens read from its folder); print what the run prints about them; write nothing."""
    tokenizer, _, data = load_inputs(cfg, Path(cfg.output_dir), ONE_PROCESS, save=False)
    prompts, _ = data_samplers(cfg, data, world_size)
    policy = resolve_model_dir(cfg.model.name_or_path) if cfg.model.name_or_path else None
    rm_ending(cfg, tokenizer, saved_stop_ids(policy, tokenizer, cfg.generation.stop_token_ids), data["styles"], True)
    pretrain, iterations = cfg.ppo.critic_pretrain_steps, cfg.train.iterations
    say(True, f"rollouts: {pretrain + iterations} ({pretrain} critic-only + {iterations} iterations) of "
              f"{prompts.global_batch} prompts each; {prompts.steps_per_epoch} per pass over the training prompts "
              f"({world_size} rank(s))")


# --------------------------------------------------------------------------------------------- run
def run(cfg: PPOConfig, resume: bool = False, prepare: Callable[[], None] | None = None,
        summary: bool = True) -> Path:
    """Train; returns output_dir/final (the policy as a HF causal LM; output_dir itself with
    train.checkpoints: false). `summary`: print the table of first -> last metrics at the end (`rlhf bench ppo`
    prints its own instead)."""
    from stages import __version__

    dist, out = open_run(cfg.output_dir, cfg.seed, prepare)
    say(dist.is_main, describe_tricks(cfg))
    tokenizer, rm_tok, data = load_inputs(cfg, out, dist)
    prompt_sampler, ptx_sampler = data_samplers(cfg, data, dist.world_size)  # before any model is built
    t, ppo = cfg.train, cfg.ppo
    B = t.rollout_batch_size
    total = ppo.critic_pretrain_steps + t.iterations
    warn_unused_settings(cfg, total, bool(data["eval"]), dist, "iteration")
    per_iter = ppo.ppo_epochs * (B // t.mini_batch_size)
    models = build_models(cfg, dist, tokenizer, rm_tok, {"policy": t.iterations * per_iter, "critic": total * per_iter})
    policy, critic = models["policy"], models["critic"]
    pad_id, vocab = tokenizer.pad_token_id, len(tokenizer)
    stop_ids = stop_token_ids(policy.module, tokenizer, cfg.generation.stop_token_ids)
    ending = rm_ending(cfg, tokenizer, stop_ids, data["styles"], dist.is_main)

    seed_everything(cfg.seed + dist.rank)
    state: dict[str, Any] = {"step": 0, "moments": [0.0, 0.0, 0.0], "start_length": None, "best_reward": None,
                             "ptx_step": 0, "monitor_fires": 0, "skipped_rollouts": 0, "skipped_micro_batches": 0}
    kept_best_at = None  # the iteration of a best/ written after the checkpoint resumed from
    if resume:
        loaded = load_latest_checkpoint(policy, out, dist, extra_engines={"critic": critic},
                                        say=lambda text: say(dist.is_main, text))
        if loaded is None:
            say(dist.is_main, f"resume: no complete checkpoint in {out}; starting from iteration 0")
        else:
            check_resume_point(int(loaded["step"]), total, out, "iteration")
            state.update(loaded)
            state["best_reward"], kept_best_at = resumed_best(out, int(state["step"]), state["best_reward"])
            say(dist.is_main, f"resumed from iteration {state['step']} ({out})")
    moments = RunningMoments(*state["moments"])
    start = int(state["step"])
    if dist.is_main:
        keep_rows_upto(out / "samples.jsonl", "iteration", start)
    metrics = MetricsLogger(out, dist.is_main, cfg.logging.tensorboard, resume_step=start if resume else None)
    progress = TrainProgress(dist.is_main, total, start, "ppo", print_every=cfg.logging.log_every, unit="iteration")
    meta = {"stage": "ppo", "rlhf_version": __version__, "model": cfg.model.name_or_path,
            "reward_model": cfg.reward_model.name_or_path,
            # the styles the policy has now seen: its own record's (SFT) and these prompts'
            "rendering": rendering_record(data["styles"] | set((read_rendering(resolve_model_dir(
                cfg.model.name_or_path)) or {}).get("styles", [])), tokenizer,
                content_special_tokens=cfg.data.content_special_tokens)}
    critic_tok = rm_tok if ppo.critic_init == "reward_model" else tokenizer
    saved_at = -1

    def save(done: int) -> Path:
        nonlocal saved_at
        state.update(step=done, moments=[moments.count, moments.mean, moments.m2])
        body = {k: v for k, v in state.items() if k != "step"}
        path = save_checkpoint(policy, tokenizer, out, done, body, dist, t.save_total_limit, meta,
                               extra={"critic": (critic, critic.module.seqcls, critic_tok)},
                               say=lambda text: say(True, text))
        metrics.event(done, "checkpoint", path=str(path))
        saved_at = done
        return path

    def validate_if_due(done: int, critic_only: bool, reasons: list[str]) -> None:
        """Validation every eval_every and save_every iterations and at the end, and best/ when its reward is the
        best yet (not during critic-only iterations, nor while the collapse monitor fires: `reasons`)."""
        if not (data["eval"] and (due(done, t.eval_every, total) or due(done, t.save_every, total))):
            return
        ev = validate(cfg, dist, models, data["eval"], tokenizer, stop_ids, ending)
        metrics.log(done, ev)
        if not math.isfinite(ev["eval/reward"]):
            metrics.event(done, "nonfinite_validation", eval_reward=str(ev["eval/reward"]))
        better = beats_best(ev["eval/reward"], state["best_reward"], critic_only)
        if better and not reasons:
            state["best_reward"] = ev["eval/reward"]
            if t.checkpoints:  # (train.checkpoints: false writes no model at all)
                save_best(models, tokenizer, out, dist, {**meta, "iteration": done, "eval_reward": ev["eval/reward"]})
            metrics.event(done, "best", eval_reward=ev["eval/reward"])
        elif better:
            metrics.event(done, "best_vetoed", eval_reward=ev["eval/reward"], reasons=reasons)
        elif done == kept_best_at and ev["eval/reward"] == state["best_reward"] and not reasons:
            metrics.event(done, "best", eval_reward=ev["eval/reward"])  # that best/, found again: kept as written
        vetoed = " (vetoed: monitor firing)" if better and reasons else ""
        progress.print(f"iteration {done}: validation reward {ev['eval/reward']:.4f}, length "
                       f"{ev['eval/response_length']:.1f}{vetoed}")

    def save_if_due(done: int) -> None:
        """Checkpoint every save_every iterations and at the end; on a stop signal (any rank), checkpoint and
        end the run (stop.Stopped)."""
        faults.maybe_signal(done)
        signum = stop.requested(dist.device)
        if not t.checkpoints:  # (train.checkpoints: false) a stop signal ends the run unsaved
            if signum:
                end_stopped(signum, done, None, metrics, progress, "iteration")
            return
        if due(done, t.save_every, total) or signum:
            path = save(done)
            if signum:
                end_stopped(signum, done, path, metrics, progress, "iteration")

    shapes = {"policy": flop_shape(unwrap(policy), lm_head=True), "critic": flop_shape(unwrap(critic), lm_head=False)}
    profiler = StepProfiler(cfg.logging.profile_step, out, dist.rank, dist.device)
    with profiler:  # writes a profiled iteration's trace also when it ends in an error
        for it in range(start, total):
            profiler.begin(it + 1)
            critic_only = it < ppo.critic_pretrain_steps
            reset_peak_memory(dist.device)
            t0 = clock(dist.device)
            # 1. rollout
            rank_rows = prompt_sampler.indices(it)[dist.rank * B:(dist.rank + 1) * B]
            p_ids, p_mask = left_pad([data["train"][i] for i in rank_rows], pad_id, dist.device)
            with record_function("rlhf.rollout"):
                rollout = sample(sampling_model(models), p_ids, p_mask, cfg.generation, stop_ids, pad_id, vocab,
                                 prompt_capacity=cfg.data.max_prompt_length)
            t_gen = clock(dist.device) - t0
            # 2-5. score, reward transform, token rewards, GAE
            with record_function("rlhf.score"):
                exp = make_experience(cfg, dist, models, rollout, moments, ending, it + 1)
            t_score = clock(dist.device) - t0 - t_gen
            if exp is None:  # a non-finite score with train.on_nonfinite: skip
                done = it + 1
                faults.maybe_kill("kill", done)
                state["skipped_rollouts"] += 1
                metrics.event(done, "skipped", reason="non-finite rollout scores")
                progress.print(f"[yellow]iteration {done}: non-finite rollout scores; batch skipped[/]")
                progress.update(done, {})
                profiler.close()  # its training work ends here too; not the validation and checkpoint
                validate_if_due(done, critic_only, [])  # a validation due now (the last one, say) still runs
                save_if_due(done)
                continue
            mask = rollout.response_mask.float()
            # 6. update
            lrs = {"lr/policy": policy.get_lr()[0], "lr/critic": critic.get_lr()[0]}
            values = rollout_metrics(cfg, dist, rollout, exp, stop_ids)
            gold = None
            if cfg.data.gold_reward:
                gold = gold_scores(cfg.data.gold_reward, tokenizer, [data["train"][i] for i in rank_rows],
                                   response_lists(rollout, stop_ids))
                values["objective/gold"] = float(all_reduce_sum([sum(gold)], dist.device)[0]) / (B * dist.world_size)
            t1 = clock(dist.device)
            values |= update(cfg, dist, models, rollout, exp, it, critic_only, data["ptx"], ptx_sampler, state, pad_id)
            t_update = clock(dist.device) - t1
            skipped_now = values.pop("skipped")
            state["skipped_micro_batches"] += int(skipped_now)
            rows, width = rollout.response.shape[0] * ppo.ppo_epochs, rollout.sequences()[0].shape[1]
            flops = train_flops(shapes["critic"], rows, width, 0)
            if not critic_only:
                flops += train_flops(shapes["policy"], rows, width, rollout.response.shape[1])
            done = it + 1
            faults.maybe_kill("kill", done)
            # metrics
            gen_tokens, seq_tokens = all_reduce_sum([float(mask.sum()), float(rollout.sequences()[1].sum())],
                                                    dist.device).tolist()
            values |= lrs | {
                "train/critic_only": float(critic_only),
                "reward_stats/mean": moments.mean, "reward_stats/std": moments.std, "reward_stats/count": moments.count,
                "reward_stats/rank_spread": rank_spread([moments.count, moments.mean, moments.std]),
                "perf/generation_s": t_gen, "perf/scoring_s": t_score, "perf/update_s": t_update,
                "perf/iteration_s": clock(dist.device) - t0, "perf/update_tflops": flops / max(t_update, 1e-9) / 1e12,
                "perf/gen_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
                "perf/train_tokens_per_s":
                    seq_tokens * ppo.ppo_epochs * (1 if critic_only else 2) / max(t_update, 1e-9),
            } | peak_memory_gib(dist.device)
            if t.on_nonfinite == "skip":
                values |= {f"train/{k}": float(state[k]) for k in ("skipped_rollouts", "skipped_micro_batches")}
            for key in ("objective/scores",) + (() if skipped_now else ("loss/value",) if critic_only else
                                                ("loss/value", "loss/policy")):
                check_finite(key, values[key], done, out)
            if state["start_length"] is None:
                state["start_length"] = values["rollout/response_length"]
            reasons = collapse_reasons(values, state["start_length"], cfg.monitor,
                                       cfg.generation.min_new_tokens >= cfg.generation.max_new_tokens)
            values["monitor/firing"] = float(bool(reasons))
            if due(done, cfg.logging.log_every, total):
                metrics.log(done, values)
            if reasons:
                state["monitor_fires"] += 1
                metrics.event(done, "monitor", reasons=reasons, action=cfg.monitor.action)
                progress.print(f"[yellow]collapse monitor at iteration {done}: {'; '.join(reasons)}[/]")
            progress.update(done, {"train reward": values["objective/scores"], "kl": values["objective/kl"],
                                   "len": values["rollout/response_length"]},
                            "(critic pre-training: the policy is not updated)" if critic_only else "")
            if dist.is_main and t.sample_every > 0 and (it == 0 or due(done, t.sample_every, total)):  # the last too
                show_samples(cfg, out, done, tokenizer, [data["train"][i] for i in rank_rows],
                             response_lists(rollout, []), exp["raw"].tolist(), gold)
            profiler.close()  # a profiled iteration's training work ends here; validation and checkpoints are not in it
            validate_if_due(done, critic_only, reasons)
            save_if_due(done)
            if reasons and cfg.monitor.action == "stop":
                if saved_at != done and t.checkpoints:
                    save(done)
                progress.close()
                metrics.close()
                then = (f"Checkpoint saved in {out}; continue past it {resume_with('monitor.action=warn')}"
                        if t.checkpoints else "No checkpoint (train.checkpoints: false); set monitor.action: warn "
                        "to run past it")
                raise RlhfError(f"the collapse monitor stopped the run at iteration {done}: {'; '.join(reasons)}. "
                                f"{then}")

    progress.close()
    final = None  # (train.checkpoints: false publishes no model)
    if t.checkpoints:
        final = publish_final(out, total, dist)
        warn_if_auto_tokenizer_differs(final, dist)
        publish_final(out, total, dist, part="critic/hf", name="final_critic")
        metrics.event(total, "final", path=str(final))
    stop.disarm()
    metrics.close()
    if dist.is_main and summary:
        print_summary("rlhf ppo", read_metrics(out / "metrics.jsonl"), final)
    return final or out
