"""How well a toy-task reward model orders a policy's responses as the gold judge does, per question set.

    python scripts/rm_gold_agreement.py RUN_DIR [--config PPO_YAML] [--questions 40] [--samples 6] [--seed 0]

RUN_DIR is a pipeline output holding sft/ and rm/ (`runs/demo`, `runs/reproduce`). For each question set --
count, spell, repeat (the questions PPO trains on) and repeat held out (the evaluation questions no stage trained
on) -- it asks the SFT policy QUESTIONS random questions SAMPLES times each (`rlhf eval`'s sampler and scoring,
with the sampling settings of --config, by default the tiny PPO config) and prints, over the pairs of responses
to one question whose gold rewards differ, the share the reward model orders as gold does (`gold_agreement`: an
RM tie counts half). Where it is low near the SFT policy, no PPO variant can raise gold on those questions; the
toy task's PPO prompts are `repeat` for that reason (README, "The toy task").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_cli.eval_options import eval_settings  # noqa: E402
from stages import toydata  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.gold import gold_agreement  # noqa: E402

#: label -> (toydata task kinds, held out)
QUESTION_SETS = {"count": ((0,), False), "spell": ((4,), False), "repeat": ((2,), False),
                 "repeat held out": ((2,), True)}


def agreement(run_dir: Path, config: Path, qs: list[str], samples: int, seed: int, work: Path) -> tuple[float, int]:
    """Samples `samples` SFT responses to each question in `qs`, scores them, and returns gold_agreement."""
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in qs for _ in range(samples)), encoding="utf-8")
    s = eval_settings(run_dir / "sft", config, reward_model=str(run_dir / "rm"), prompts=prompts, gold="toy",
                      seed=seed)
    out = work / "eval.json"
    evaluate(s, out)
    rows = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return gold_agreement(group_samples(rows, qs, samples))


def group_samples(rows: list[dict], qs: list[str], samples: int) -> list[list[tuple[float, float]]]:
    """(RM reward, gold) of each question's `samples` responses: `rlhf eval` writes one row per prompt, in
    order, and each question was asked `samples` times in a row. A lost or reordered row is an error, not a
    shifted grouping."""
    if len(rows) != len(qs) * samples:
        raise SystemExit(f"expected {len(qs) * samples} samples, rlhf eval wrote {len(rows)}")
    groups = []
    for i, q in enumerate(qs):
        group = rows[i * samples:(i + 1) * samples]
        if any(q not in r["prompt"] for r in group):
            raise SystemExit(f"samples {i * samples}-{(i + 1) * samples - 1} are not all answers to {q!r}")
        groups.append([(r["policy_reward"], r["policy_gold"]) for r in group])
    return groups


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/tiny/ppo.yaml")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"RM {args.run_dir / 'rm'} on samples of {args.run_dir / 'sft'} "
          f"({args.questions} questions x {args.samples} samples per set)")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (kinds, held)) in enumerate(QUESTION_SETS.items()):
            qs = toydata.questions(args.questions, args.seed + i, kinds, held)
            share, pairs = agreement(args.run_dir, args.config, qs, args.samples, args.seed, Path(tmp))
            print(f"{label:>16}: " + (f"{share:6.1%} of {pairs} pairs with different gold ordered as gold orders them"
                                      if pairs else "no two responses to one question differ in gold"))


if __name__ == "__main__":
    main(sys.argv[1:])
