"""Issue 14's tiny-Gemma acceptance: with a rule reward, REINFORCE raises the reward with a
bounded KL, and J-BOND's (KL, reward) points stay near the reference's Best-of-N curve.

Setup (all generated here, CPU, minutes): bilingual "language" preference pairs (the same
content in the prompt's language and in the other one); an SFT policy (tiny Gemma 2) trained to
answer with the right-language reply 60% of the time and the wrong-language one 40%; reward =
the `language_match` rule (1 when the reply's script matches the prompt's). Then, from the SFT
policy, `stage=reinforce` (RLOO, β = 0.05) and `stage=bond variant=jbond` (β = 0.5, η = 0.02)
through the same stage code a user runs.

    .venv/bin/python experiments/rl_tiny/run.py            # seeds 0 1 2, prepends RESULTS.md
    .venv/bin/python experiments/rl_tiny/run.py --seeds 0  # one seed (what the test runs)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.bench.common import prepend_results

RESULTS = Path(__file__).with_name("RESULTS.md")
SFT_STEPS, RL_STEPS, RIGHT_LANGUAGE = 200, 40, 0.6
# Gates. The reward is the per-step mean over 8 prompts x k samples, so steps are smoothed.
# REINFORCE: last 10 steps' mean reward over the SFT policy's (its Best-of-1 value from 256
# samples: σ ≈ 0.03). The end estimate has σ ≈ 0.02 (320 samples), so +0.10 is > 3σ of both.
REWARD_GAIN = 0.10
KL_BUDGET = 3.0  # nats per sequence: REINFORCE's KL to the SFT policy stays below this
BON_BAND = (-0.2, 0.1)  # J-BOND: smoothed reward − Best-of-N reward at the same KL
SMOOTHING = 8  # steps of the trailing mean the J-BOND gate reads


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    return path


def make_data(root: Path, seed: int) -> dict[str, Path]:
    """SFT rows (right language with probability 0.6), prompts, a tokenizer."""
    from posttrain.data.synthetic_preferences import preference_corpus, preference_rows
    from posttrain.tokenizer import train_tokenizer

    pairs = preference_rows(3000, seed=seed, mix={"language": 1.0})
    held_out = preference_rows(200, seed=seed + 1000, mix={"language": 1.0})
    rng = random.Random(seed)
    sft = [
        {
            "prompt": p["prompt"],
            "response": p["chosen"] if rng.random() < RIGHT_LANGUAGE else p["rejected"],
        }
        for p in pairs
    ]
    tokenizer = train_tokenizer(preference_corpus(pairs), root / "tok", 900)
    return {
        "train": _write_jsonl(root / "sft.jsonl", sft),
        "prompts": _write_jsonl(
            root / "prompts.jsonl", [{"prompt": p["prompt"]} for p in held_out]
        ),
        "tokenizer": Path(tokenizer),
    }


def _stage(stage: str, run_dir: Path, *overrides: str) -> dict[str, Any]:
    from posttrain.cli import _compose, run_stage

    arguments = [f"stage={stage}", f"run_dir={run_dir}", "logger=disabled", *overrides]
    return run_stage(_compose(arguments), arguments)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def smoothed(values: list[float], window: int = 5) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start)."""
    values = np.asarray(values, np.float64)
    return np.array([values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))])


def run_seed(seed: int, root: Path) -> dict[str, Any]:
    """SFT, then REINFORCE and J-BOND from it; the numbers the gates read."""
    data = make_data(root, seed)
    sft = _stage(
        "sft", root / "sft", f"data.train={data['train']}", f"stage.tokenizer={data['tokenizer']}",
        f"stage.steps={SFT_STEPS}", "optim.lr=3e-3", "optim.warmup_steps=20", "data.batch_size=32",
        "data.max_length=64", "stage.save_every=0", f"seed={seed}",
    )  # fmt: skip
    common = [
        f"stage.init_checkpoint={sft['checkpoint']}", f"stage.prompts={data['prompts']}",
        "stage.reward=language_match", f"stage.steps={RL_STEPS}", "stage.prompts_per_step=8",
        "stage.max_new_tokens=24", "stage.save_every=0", "stage.bon_pool=8", "stage.bon_prompts=32",
        f"stage.seed={seed}", "optim.warmup_steps=0",
    ]  # fmt: skip
    _stage("reinforce", root / "reinforce", *common, "stage.beta=0.05", "optim.lr=3e-4")
    # One policy sample per prompt (J-BOND's design): 24 prompts a step for a readable reward.
    _stage(
        "bond", root / "jbond", *common, "stage.variant=jbond", "stage.prompts_per_step=24",
        "optim.lr=3e-4",
    )  # fmt: skip
    curve = json.loads((root / "reinforce" / "bon_curve.json").read_text())
    reinforce, jbond = _rows(root / "reinforce"), _rows(root / "jbond")
    rewards = [r["reward"] for r in reinforce]
    jb_reward = smoothed([r["reward"] for r in jbond], SMOOTHING)
    jb_kl = smoothed([r["kl_k1"] for r in jbond], SMOOTHING)
    # Points after the smoothing window has filled, where the KL is on the curve's range.
    inside = (np.arange(len(jb_kl)) >= SMOOTHING - 1) & (jb_kl <= curve["kl"][-1])
    gaps = jb_reward[inside] - np.interp(jb_kl[inside], curve["kl"], curve["reward"])
    return {
        "seed": seed,
        "bon_reward": curve["reward"],
        "reinforce_start": float(curve["reward"][0]),  # the SFT policy's mean reward
        "reinforce_end": float(np.mean(rewards[-10:])),
        "reinforce_kl_end": float(np.mean([r["kl_k1"] for r in reinforce[-10:]])),
        "reinforce_gap_max": float(max(r["sampler_gap"] for r in reinforce)),
        "jbond_start": float(jb_reward[SMOOTHING - 1]),
        "jbond_end": float(jb_reward[-1]),
        "jbond_kl_end": float(jb_kl[-1]),
        "jbond_gap_min": float(gaps.min()) if gaps.size else float("nan"),
        "jbond_gap_max": float(gaps.max()) if gaps.size else float("nan"),
        "jbond_points_compared": int(gaps.size),
    }


def gates(result: dict[str, Any]) -> dict[str, bool]:
    """Issue 14's tiny acceptance on one seed."""
    return {
        f"REINFORCE reward +{REWARD_GAIN}": result["reinforce_end"]
        >= result["reinforce_start"] + REWARD_GAIN,
        f"REINFORCE KL <= {KL_BUDGET}": result["reinforce_kl_end"] <= KL_BUDGET,
        "sampler = trainer (gap < 1e-4)": result["reinforce_gap_max"] < 1e-4,
        f"J-BOND within {BON_BAND} of Best-of-N": result["jbond_points_compared"] >= 5
        and BON_BAND[0] <= result["jbond_gap_min"]
        and result["jbond_gap_max"] <= BON_BAND[1],
    }


def main() -> None:
    """Run the seeds; print and prepend a results section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    lines = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as root:
            result = run_seed(seed, Path(root))
        passed = gates(result)
        print(json.dumps(result), passed, flush=True)
        lines.append(
            f"| {seed} | {result['reinforce_start']:.3f} → {result['reinforce_end']:.3f} | "
            f"{result['reinforce_kl_end']:.2f} | {result['jbond_start']:.3f} → "
            f"{result['jbond_end']:.3f} at KL {result['jbond_kl_end']:.2f} | "
            f"{result['jbond_gap_min']:+.3f} … {result['jbond_gap_max']:+.3f} "
            f"({result['jbond_points_compared']} points) | "
            f"{', '.join(f'{b:.2f}' for b in result['bon_reward'])} | "
            f"{'all pass' if all(passed.values()) else [k for k, v in passed.items() if not v]} |"
        )
    header = "# Tiny RL acceptance (issue 14): REINFORCE and J-BOND on a tiny Gemma 2\n\n"
    section = "\n".join(
        [
            f"## {datetime.date.today()} — {platform.machine()}, {platform.processor() or 'cpu'}",
            "",
            f"SFT {SFT_STEPS} steps (right language {RIGHT_LANGUAGE:.0%} of the replies), "
            f"RL {RL_STEPS} steps, 8 prompts per step; gates: REINFORCE reward +{REWARD_GAIN} "
            f"(last 10 steps vs the SFT policy's mean reward over 256 samples), KL ≤ {KL_BUDGET}; J-BOND's {SMOOTHING}-step-smoothed reward "
            f"within {BON_BAND} of the reference's Best-of-N curve where its KL is on the curve.",
            "",
            "| seed | REINFORCE reward | its KL | J-BOND reward | J-BOND − BoN | BoN n = 1..8 | gates |",
            "|---|---|---|---|---|---|---|",
            *lines,
            "",
        ]
    )
    print(section)
    prepend_results(RESULTS, header, section)


if __name__ == "__main__":
    main()
