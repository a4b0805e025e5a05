"""Unit tests of `rlhf eval` (stages/evaluate.py, rlhf_cli/eval_options.py) without a trained pipeline: the
win-rate and summary statistics on hand-made lists, generate() on a tiny random model, evaluate() with its
models, tokenizers and sampler faked (which model is sampled against which, which prompts, what is written),
and the option resolution of eval_settings."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from stages import evaluate as ev
from stages.config import GenerationConfig, PPODataConfig
from stages.eval_settings import EvalSettings
from stages.evaluate import Generated, recorded_settings, summarize, win_rate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
EOS, PAD = 1, 0


# --- statistics ---------------------------------------------------------------------------------------------


def test_win_rate_with_every_prompt_non_finite_is_all_none_and_counts_them() -> None:
    """No finite pair left: every share is None and `nonfinite` counts the prompts left out."""
    nan, inf = float("nan"), float("inf")
    assert win_rate([nan, 1.0], [0.0, inf]) == {"win_rate": None, "wins": None, "ties": None, "losses": None,
                                                "nonfinite": 2}


def test_win_rate_of_the_policy_against_the_baseline_counts_a_tie_as_half() -> None:
    """3 wins, 1 exact tie, 1 loss of 5: (3 + 0.5) / 5 = 0.7; swapping the sides gives 1 - 0.7."""
    mine, theirs = [2.0, 1.0, 0.5, 3.0, 0.0], [1.0, 0.0, 0.5, 2.0, 1.0]
    assert win_rate(mine, theirs) == pytest.approx({"win_rate": 0.7, "wins": 0.6, "ties": 0.2, "losses": 0.2,
                                                    "nonfinite": 0})
    assert win_rate(theirs, mine)["win_rate"] == pytest.approx(0.3)


def test_summary_reward_and_kl_are_means_not_medians() -> None:
    """Skewed lists (median 0): reward [0, 0, 3] has mean 1, kl [0, 0, 6] mean 2, gold [0, 0, 1] mean 1/3."""
    gen = Generated(responses=[[2], [3], [4]], truncated=[False, False, False], reward=[0.0, 0.0, 3.0],
                    gold=[0.0, 0.0, 1.0], kl=[0.0, 0.0, 6.0])
    got = summarize(gen, 3)
    assert (got["reward"], got["kl"]) == (1.0, 2.0) and got["gold"] == pytest.approx(1 / 3)


def test_recorded_settings_name_every_sampling_choice() -> None:
    """eval.json's `settings`: data, held_out, num_prompts, batch_size, seed, precision, ngram and the generation
    keys."""
    s = EvalSettings(policy="p", reward_model="r", data=PPODataConfig(train="x.jsonl"),
                     generation=GenerationConfig(max_new_tokens=7), num_prompts=5, batch_size=3, seed=11, ngram=2)
    got = recorded_settings(s, "bf16")
    assert set(got) == {"data", "held_out", "num_prompts", "batch_size", "seed", "precision", "ngram", "generation"}
    assert (got["num_prompts"], got["batch_size"], got["seed"], got["precision"], got["ngram"]) == (5, 3, 11, "bf16", 2)
    assert got["generation"]["max_new_tokens"] == 7 and got["data"]["train"]["path"] == "x.jsonl"
    assert got["held_out"] is None
    s.held_out = (0.25, 3)
    assert recorded_settings(s, "bf16")["held_out"] == [0.25, 3]


def test_the_eval_table_says_n_a_for_a_win_rate_with_no_finite_score() -> None:
    """A win-rate whose every prompt was left out prints `n/a`, not a formatting error."""
    from rich.console import Console

    buf = io.StringIO()
    results = {"prompts": 2, "seed": 0, "policy_metrics": {"reward": 1.0}, "baseline_metrics": {"reward": 0.5},
               "win_rate_rm": {"win_rate": None, "wins": None, "ties": None, "losses": None, "nonfinite": 2}}
    ev.print_results(results, Console(file=buf, width=120))
    assert "every score non-finite" in buf.getvalue() and "n/a" in buf.getvalue()


# --- generate() on a tiny model -----------------------------------------------------------------------------


def _tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        pad_token_id=PAD, eos_token_id=EOS)).eval()


def _tiny_settings(seed: int) -> EvalSettings:
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, cache="dynamic")
    return EvalSettings(policy="p", reward_model="r", data=PPODataConfig(train="x.jsonl"), generation=gen,
                        batch_size=2, seed=seed)


_TOK = type("Tok", (), {"pad_token_id": PAD, "__len__": lambda self: 40})()


def test_generate_answers_every_prompt_and_reseeds_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three prompts in batches of 2: three responses; a second call draws the same ones whatever the global RNG
    did in between (it seeds with s.seed), and another seed draws others."""
    monkeypatch.setattr(ev, "raw_scores", lambda gen, reward, ids, *a: torch.zeros(ids.shape[0]))
    model = _tiny_lm()

    def run(seed: int) -> Generated:
        torch.rand(17)  # the global stream moved on
        return ev.generate(model, [[5, 6], [7], [8, 9, 10]], _tiny_settings(seed), _TOK, None, [EOS], None,
                           torch.device("cpu"))

    first = run(3)
    assert len(first.responses) == len(first.truncated) == len(first.reward) == 3
    assert run(3).responses == first.responses
    assert any(run(k).responses != first.responses for k in (4, 5))


def test_generate_kl_leaves_the_padding_after_a_stop_token_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A response that stopped early (padding after its stop token in its batch: seed 7 draws one) sums log pi - log
    pi_ref over its own tokens, the stop token included, not over the padded columns."""
    import copy

    from stages.ppo.rollout import response_logprobs

    monkeypatch.setattr(ev, "raw_scores", lambda gen, reward, ids, *a: torch.zeros(ids.shape[0]))
    sampled = []
    real = ev.sample
    monkeypatch.setattr(ev, "sample", lambda *a, **k: sampled.append(real(*a, **k)) or sampled[-1])
    model = _tiny_lm()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = ev.generate(model, [[5, 6], [7], [8, 9, 10]], _tiny_settings(7), _TOK, None, [EOS], None,
                      torch.device("cpu"), reference)
    assert any(bool((roll.response_mask == 0).any()) for roll in sampled)  # some padding to leave out
    want = []
    for roll in sampled:
        ids, att = roll.sequences()
        lp, _ = response_logprobs(model, ids, att, roll.prompt_width, roll.response)
        ref, _ = response_logprobs(reference, ids, att, roll.prompt_width, roll.response)
        want += ((lp - ref) * roll.response_mask).sum(1).tolist()
    assert out.kl == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_generate_kl_leaves_out_the_stop_ids_held_back_before_min_new_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_new_tokens = max_new_tokens: the stop id is never drawn, so a reference that differs from the policy in
    the stop id's logit alone (its LM-head row) gives a KL of 0: the log-probs leave the held id out, as rlhf ppo's
    scoring does (without it, every token's KL would move)."""
    import copy

    monkeypatch.setattr(ev, "raw_scores", lambda gen, reward, ids, *a: torch.zeros(ids.shape[0]))
    model = _tiny_lm()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.lm_head.weight[EOS] += 2.0
    s = _tiny_settings(7)
    s.generation = GenerationConfig(max_new_tokens=4, min_new_tokens=4, cache="dynamic")
    out = ev.generate(model, [[5, 6], [7], [8, 9, 10]], s, _TOK, None, [EOS], None, torch.device("cpu"), reference)
    assert out.kl == pytest.approx([0.0] * 3, abs=1e-5)
    s.generation = GenerationConfig(max_new_tokens=4, cache="dynamic")  # (none held: the moved EOS shows)
    assert max(map(abs, ev.generate(model, [[5, 6], [7], [8, 9, 10]], s, _TOK, None, [EOS], None,
                                    torch.device("cpu"), reference).kl)) > 1e-3


# --- evaluate() with its models faked -----------------------------------------------------------------------


class _Tok:
    """A tokenizer stand-in: ids decode to `t<id>`, the EOS to `<eos>` (dropped with skip_special_tokens)."""

    pad_token_id = PAD

    def __len__(self) -> int:
        return 40

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join("<eos>" if i == EOS else f"t{i}" for i in ids if not (skip_special_tokens and i == EOS))


def _fake_evaluate(monkeypatch: pytest.MonkeyPatch, gens: dict[str, Generated], n_prompts: int = 5, cut: int = 0,
                   **opts: Any) -> tuple[EvalSettings, list[tuple[str, list[int], Any]], list[str]]:
    """Settings for evaluate() whose prompts are [[10], [11], ...] and whose model `path` samples gens[path]
    (prompt k's entries), with the calls to generate (model, prompt ids, reference) and the warnings recorded."""
    import stages.ppo.models as ppo_models

    calls: list[tuple[str, list[int], Any]] = []
    said: list[str] = []
    monkeypatch.setattr(ev, "resolve_model_dir", lambda p: str(p))
    monkeypatch.setattr(ev, "check_architecture", lambda *a, **k: None)
    monkeypatch.setattr(ev, "_tokenizer", lambda path, what: _Tok())
    monkeypatch.setattr(ppo_models, "check_tokenizers", lambda *a, **k: None)
    monkeypatch.setattr(ppo_models, "build_reward", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(ppo_models, "stop_token_ids", lambda *a: [EOS])
    monkeypatch.setattr(ev, "load_prompts", lambda *a, limit=None, **k: (  # (its first `limit`, as load_prompts)
        [[10 + i] for i in range(min(n_prompts, limit or n_prompts))], cut, None))
    monkeypatch.setattr(ev, "check_rendering", lambda *a, **k: None)
    monkeypatch.setattr(ev, "check_gold_prompts", lambda *a, **k: None)
    monkeypatch.setattr(ev, "ending_for", lambda *a, **k: None)
    monkeypatch.setattr(ev, "_load_lm", lambda path, *a: path)
    monkeypatch.setattr(ev, "say", lambda enabled, text: said.append(text))

    def generate(model: str, prompts: list[list[int]], s: EvalSettings, tok: Any, reward: Any, stop_ids: list[int],
                 ending: Any, device: torch.device, reference: Any = None) -> Generated:
        calls.append((model, [p[0] for p in prompts], reference))
        g, idx = gens[model], [p[0] - 10 for p in prompts]
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return Generated(pick(g.responses), pick(g.truncated), pick(g.reward), pick(g.gold),
                         pick(g.kl) if reference is not None else None)

    monkeypatch.setattr(ev, "generate", generate)
    s = EvalSettings(policy="pol", reward_model="rm", data=PPODataConfig(train="x.jsonl"), **opts)
    return s, calls, said


def _gen(rewards: list[float], responses: list[list[int]] | None = None, truncated: list[bool] | None = None,
         gold: list[float] | None = None) -> Generated:
    n = len(rewards)
    return Generated(responses or [[20 + i] for i in range(n)], truncated or [False] * n, rewards, gold,
                     [0.1 * i for i in range(n)])


def test_evaluate_takes_the_first_n_prompts_and_warns_only_when_fewer_are_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """--num-prompts 3 of 5: prompts 0, 1, 2 (the README's first N); 5 of 5 says nothing; 6 of 5 warns."""
    s, calls, said = _fake_evaluate(monkeypatch, {"pol": _gen([0.0] * 5)}, num_prompts=3)
    assert ev.evaluate(s)["prompts"] == 3 and calls[0][1] == [10, 11, 12]
    s.num_prompts = 5
    assert ev.evaluate(s)["prompts"] == 5 and not any("prompts asked" in t for t in said)
    s.num_prompts = 6
    assert ev.evaluate(s)["prompts"] == 5 and any("6 prompts asked (--num-prompts), 5 usable" in t for t in said)


def test_evaluate_takes_the_ppo_run_s_validation_share_of_data_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """`held_out` (a PPO config without data.eval): every prompt of data.train is read and the seeded share rlhf
    ppo held out for validation is evaluated (split_holdout, as the run split them: rows it did not train on), its first
    --num-prompts; the source is said."""
    from stages.trainer import split_holdout

    s, calls, said = _fake_evaluate(monkeypatch, {"pol": _gen([0.0] * 8)}, cut=3, held_out=(0.25, 1))
    read = [[17 - i] for i in range(8)]  # (data.train's prompts in file order, not sorted)
    monkeypatch.setattr(ev, "load_prompts", lambda *a, limit=None, **k: (read[:limit] if limit else read, 3, None))
    held = [p[0] for p in split_holdout(read, 0.25, 1)[1]]
    assert len(held) == 2 and held != [p[0] for p in split_holdout(read, 0.25, 0)[1]]  # (the seed chooses)
    assert ev.evaluate(s)["prompts"] == 2 and calls[0][1] == held
    assert any("2 of the validation share of x.jsonl (data.eval_fraction 0.25, seed 1)" in t for t in said), said
    assert any("3 of data.train's prompts (before the validation share was taken) cut" in t for t in said), said
    calls.clear()
    s.num_prompts = 1
    assert ev.evaluate(s)["prompts"] == 1 and calls[0][1] == held[:1]
    assert not any("not the share" in t for t in said)  # (no record of the run's rows: nothing to compare)


def test_evaluate_says_when_the_share_is_not_the_one_the_run_held_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_share` (the run's data_report.json): a share of other usable rows of data.train (a --set data.* that
    changes which rows are read) or of another data.eval_fraction (a larger share holds prompts the run trained
    on) is a warning naming the report; the same share says nothing."""
    from stages.ppo.prompts import held_out_sha256

    read = [(0, i) for i in range(1, 9)]
    s, _, said = _fake_evaluate(monkeypatch, {"pol": _gen([0.0] * 8)}, n_prompts=8, held_out=(0.25, 1),
                                run_share=(held_out_sha256(read, 0.25, 1), "run/data_report.json"))

    def load_prompts(*a: Any, rows: list[tuple[int, int]], **k: Any) -> tuple[list[list[int]], int, None]:
        rows += read
        return [[10 + i] for i in range(len(read))], 0, None

    monkeypatch.setattr(ev, "load_prompts", load_prompts)
    ev.evaluate(s)
    assert not any("not the share" in t for t in said), said
    warning = ("warning: this is not the share rlhf ppo held out: data.train's usable rows or data.eval_fraction "
               "differ from those its run split with (run/data_report.json), so prompts it trained on may be "
               "among these")
    s.held_out = (0.5, 1)
    ev.evaluate(s)
    assert sum(warning in t for t in said) == 1, said
    s.held_out = (0.25, 1)
    read.pop(3)  # (a row the run read is not usable here)
    ev.evaluate(s)
    assert sum(warning in t for t in said) == 2, said


def test_evaluate_kl_reference_is_the_reference_else_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    """--reference alone: the policy is sampled against it; --baseline and --reference: the baseline model is
    sampled (without a KL) and the reference is the KL's."""
    gens = {"pol": _gen([1.0] * 5), "base": _gen([0.0] * 5), "ref": _gen([0.0] * 5)}
    s, calls, _ = _fake_evaluate(monkeypatch, gens, reference="ref")
    res = ev.evaluate(s)
    assert res["reference"] == "ref" and calls == [("pol", [10, 11, 12, 13, 14], "ref")]
    calls.clear()
    s.baseline = "base"
    res = ev.evaluate(s)
    assert [(c[0], c[2]) for c in calls] == [("pol", "ref"), ("base", None)] and res["reference"] == "ref"
    assert "kl" in res["policy_metrics"] and "kl" not in res["baseline_metrics"]


def test_greedy_evaluate_estimates_no_kl_and_ignores_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """generation.top_k 1 (--greedy): neither the --reference nor the baseline is taken as a KL reference (no
    model is passed to generate for it, nor checked), the --reference is said to be ignored, eval.json says
    "decoding": "greedy" and the table's title says greedy instead of the seed."""
    from rich.console import Console

    gens = {"pol": _gen([1.0] * 5), "base": _gen([0.0] * 5)}
    s, calls, said = _fake_evaluate(monkeypatch, gens, reference="ref", baseline="base",
                                    generation=GenerationConfig(top_k=1))
    checked: list[str] = []
    monkeypatch.setattr(ev, "check_architecture", lambda path, *a: checked.append(path))
    res = ev.evaluate(s)
    assert [(c[0], c[2]) for c in calls] == [("pol", None), ("base", None)] and "ref" not in checked
    assert "reference" not in res and "kl" not in res["policy_metrics"] and res["decoding"] == "greedy"
    assert any(t.startswith("[yellow]--reference ref ignored: greedy decoding") for t in said), said
    buf = io.StringIO()
    ev.print_results(res, Console(file=buf, width=120))
    assert "rlhf eval: 5 prompts (greedy)" in buf.getvalue()
    s.generation = GenerationConfig(top_k=2)  # sampled: the reference is the KL's, as before
    calls.clear()
    assert ev.evaluate(s)["decoding"] == "sampled" and [(c[0], c[2]) for c in calls] == [("pol", "ref"), ("base", None)]


def test_evaluate_renders_prompts_with_the_configs_chat_template(monkeypatch: pytest.MonkeyPatch) -> None:
    """data.chat_template (a PPO config's, or --set) is the policy tokenizer's template when the prompts are
    read, as rlhf ppo renders them (it was ignored: the tokenizer's own template rendered them)."""
    s, _, _ = _fake_evaluate(monkeypatch, {"pol": _gen([1.0] * 5)})
    s.data = PPODataConfig(train="x.jsonl", chat_template="{{ messages[0]['content'] }}")
    seen: list[Any] = []
    monkeypatch.setattr(ev, "load_prompts", lambda source, data, tok, *a, limit=None, **k: (
        seen.append(getattr(tok, "chat_template", None)), ([[10]], 0, None))[1])
    ev.evaluate(s)
    assert seen == ["{{ messages[0]['content'] }}"]


def test_evaluate_win_rate_is_the_policys_and_a_cut_response_is_no_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy scores higher on prompts 0-2, lower on 3; prompt 4 has the same tokens on both sides but the
    policy's stopped and the baseline's was cut: not identical, so the policy's higher score wins it (4 of 5)."""
    pol = _gen([2.0, 2.0, 2.0, 0.0, 2.0], responses=[[1], [2], [3], [4], [9]])
    base = _gen([1.0, 1.0, 1.0, 1.0, 1.0], responses=[[5], [6], [7], [8], [9]], truncated=[False] * 4 + [True])
    s, _, _ = _fake_evaluate(monkeypatch, {"pol": pol, "base": base}, baseline="base")
    assert ev.evaluate(s)["win_rate_rm"] == pytest.approx({"win_rate": 0.8, "wins": 0.8, "ties": 0.0,
                                                          "losses": 0.2, "nonfinite": 0})


def test_evaluate_writes_each_sides_own_scores_and_text_to_the_samples(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """eval.samples.jsonl: each row's prompt (special tokens kept), the policy's and the baseline's responses
    (special tokens dropped) with their own RM scores; eval.json holds the results returned."""
    pol = _gen([3.0, 4.0], responses=[[21, EOS, 22], [23]])
    base = _gen([1.0, 2.0], responses=[[31], [EOS, 32]])
    s, _, _ = _fake_evaluate(monkeypatch, {"pol": pol, "base": base}, n_prompts=2, baseline="base")
    res = ev.evaluate(s, tmp_path / "out" / "ev.json")
    rows = [json.loads(line) for line in (tmp_path / "out" / "ev.samples.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "t10", "policy": "t21 t22", "policy_reward": 3.0, "baseline": "t31", "baseline_reward": 1.0},
                    {"prompt": "t11", "policy": "t23", "policy_reward": 4.0, "baseline": "t32", "baseline_reward": 2.0}]
    written = json.loads((tmp_path / "out" / "ev.json").read_text())
    assert written == json.loads(json.dumps(res)) and written["win_rate_rm"]["win_rate"] == 1.0


# --- eval_settings ------------------------------------------------------------------------------------------


def _ppo_yaml(tmp_path: Path) -> Path:
    """The tiny PPO config with absolute data paths (train and eval both set), a policy path never loaded, seed 42,
    bf16 and 4-grams."""
    cfg = yaml.safe_load((TINY / "ppo.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tmp_path / "gone-sft")
    cfg["data"].update(train=str(TINY / "data" / "prompts.jsonl"), eval=str(TINY / "data" / "eval_prompts.jsonl"))
    cfg["seed"] = 42
    cfg["deepspeed"]["precision"] = "bf16"
    cfg.setdefault("monitor", {})["ngram"] = 4
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_settings_defaults_without_a_config(tmp_path: Path) -> None:
    """Without --config: seed 0, ngram 3, float32, batch 32, every prompt, no gold judge; --gold toy sets it."""
    from rlhf_cli.eval_options import eval_settings

    (tmp_path / "policy").mkdir()
    prompts = TINY / "data" / "eval_prompts.jsonl"
    s = eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts)
    assert (s.seed, s.ngram, s.dtype, s.batch_size, s.num_prompts) == (0, 3, "float32", 32, None)
    assert s.data.gold_reward is None and s.baseline is None and s.reference is None
    s = eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, gold="toy", num_prompts=4,
                      batch_size=5)
    assert (s.data.gold_reward, s.num_prompts, s.batch_size) == ("toy", 4, 5)


def test_eval_settings_options_win_over_the_config(tmp_path: Path) -> None:
    """The config's data.eval (not data.train), seed, precision and n-gram; --seed 0, --temperature and --precision
    win over them."""
    from rlhf_cli.eval_options import eval_settings

    (tmp_path / "policy").mkdir()
    cfg = _ppo_yaml(tmp_path)
    s = eval_settings(tmp_path / "policy", cfg, reward_model="some/rm")
    assert s.data.train.path == str(TINY / "data" / "eval_prompts.jsonl")
    assert (s.seed, s.dtype, s.ngram, s.generation.temperature, s.data.gold_reward) == (42, "bfloat16", 4, 0.8, "toy")
    s = eval_settings(tmp_path / "policy", cfg, reward_model="some/rm", seed=0, temperature=0.3, precision="fp32")
    assert (s.seed, s.generation.temperature, s.dtype) == (0, 0.3, "float32")


def test_eval_settings_evaluate_the_validation_share_of_a_config_without_data_eval(tmp_path: Path) -> None:
    """A PPO config without data.eval: data.train's validation share (eval_fraction, the config's seed; not the
    --seed that samples); none with data.eval, --prompts or eval_fraction 0 (data.train itself), also when
    --set data.eval_fraction gives it."""
    from rlhf_cli.eval_options import eval_settings

    (tmp_path / "policy").mkdir()
    cfg = _ppo_yaml(tmp_path)
    assert eval_settings(tmp_path / "policy", cfg, reward_model="some/rm").held_out is None  # (data.eval set)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(eval=None, eval_fraction=0.2)
    raw["output_dir"] = str(tmp_path / "run")
    cfg.write_text(yaml.safe_dump(raw))
    s = eval_settings(tmp_path / "policy", cfg, reward_model="some/rm", seed=5)
    assert s.held_out == (0.2, 42) and s.seed == 5 and s.data.train.path == str(TINY / "data" / "prompts.jsonl")
    assert s.run_share is None  # (no run in output_dir yet)
    run = Path(raw["output_dir"])
    run.mkdir(parents=True)
    (run / "data_report.json").write_text('{"eval": {"held_out_of_train": 2, "held_out_sha256": "abc"}}')
    assert eval_settings(tmp_path / "policy", cfg, reward_model="some/rm").run_share == (
        "abc", str(run / "data_report.json"))  # (what the run split: the evaluation checks its rows against it)
    assert eval_settings(tmp_path / "policy", cfg, reward_model="some/rm",
                         prompts=TINY / "data" / "eval_prompts.jsonl").held_out is None
    assert eval_settings(tmp_path / "policy", cfg, reward_model="some/rm",
                         overrides=["data.eval_fraction=0.5"]).held_out == (0.5, 42)
    assert eval_settings(tmp_path / "policy", cfg, reward_model="some/rm",
                         overrides=["data.eval_fraction=0"]).held_out is None
    raw["data"]["eval_fraction"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    assert eval_settings(tmp_path / "policy", cfg, reward_model="some/rm").held_out is None


def test_eval_settings_record_local_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative --prompts, POLICY and --baseline folder become absolute (against the working directory)."""
    from rlhf_cli.eval_options import eval_settings

    (tmp_path / "policy").mkdir()
    (tmp_path / "sft").mkdir()
    (tmp_path / "p.jsonl").write_text((TINY / "data" / "eval_prompts.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    s = eval_settings(Path("policy"), None, reward_model="some/rm", prompts=Path("p.jsonl"), baseline="sft")
    assert (s.policy, s.baseline, s.data.train.path) == (str(tmp_path / "policy"), str(tmp_path / "sft"),
                                                         str(tmp_path / "p.jsonl"))


def test_eval_settings_name_what_is_missing_or_malformed(tmp_path: Path) -> None:
    """No prompts, no reward model, and a --set with no key below its section are each one ConfigError."""
    from rlhf_cli.eval_options import eval_settings
    from stages.errors import ConfigError

    (tmp_path / "policy").mkdir()
    prompts = TINY / "data" / "eval_prompts.jsonl"
    with pytest.raises(ConfigError, match=r"rlhf eval needs --prompts \(or --config with data\)"):
        eval_settings(tmp_path / "policy", None, reward_model="some/rm")
    with pytest.raises(ConfigError, match=r"rlhf eval needs --reward-model \(or --config with reward_model\)"):
        eval_settings(tmp_path / "policy", None, prompts=prompts)
    with pytest.raises(ConfigError, match=r"--set generation=1: rlhf eval takes data.\* \(not data.train/eval"):
        eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, overrides=["generation=1"])
    for option in ({"num_prompts": 0}, {"batch_size": -1}):  # (the CLI's options refuse them first)
        (name, value), = option.items()
        with pytest.raises(ConfigError, match=rf"^rlhf eval: {name} must be at least 1, got {value}$"):
            eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, **option)
    assert eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, num_prompts=1,
                         batch_size=1).num_prompts == 1


def test_evaluate_writes_a_nan_score_as_strict_json_and_warns_of_it(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """A NaN policy score: eval.json is still strict JSON (no bare NaN), the prompt is left out of the RM
    win-rate with a warning naming the count, and the prompts cut to length are recorded."""
    pol, base = _gen([float("nan"), 2.0, 0.0]), _gen([1.0, 1.0, 1.0], responses=[[30], [31], [32]])
    s, _, said = _fake_evaluate(monkeypatch, {"pol": pol, "base": base}, n_prompts=3, cut=2, baseline="base")
    ev.evaluate(s, tmp_path / "ev.json")
    written = json.loads((tmp_path / "ev.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert written["cut_prompts"] == 2
    assert written["win_rate_rm"] == {"win_rate": 0.5, "wins": 0.5, "ties": 0.0, "losses": 0.5, "nonfinite": 1}
    assert any("1 prompt(s) with a non-finite rm score left out of the rm win-rate" in t for t in said), said
