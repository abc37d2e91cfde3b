"""The flagship result, tiny: the Gemma 2 JPN language-error fix on a CPU (issue 15's gates).

Runs `recipes/jpn_language_fix_tiny.yaml` once per seed (every stage's seed is the recipe
seed), reads its evaluate stages, prints the table and checks the targets:

- the SFT policy answers challenging Japanese prompts in the wrong language 20-40% of the time
  when sampled, and beam search does better than sampling;
- RL against a plain reward model (English-dominant preferences) leaves the rate >= 10%;
- RL and J-BOND against the WARM preamble reward model bring it <= 1%, with the 95% Wilson
  interval's upper end <= 2%; every preamble row keeps greedy and sampled answer accuracy at most
  2 points below SFT's (the plain row is the control: its accuracy is reported, not gated).

Each seed's section in `results.md` (the table, the gates, the exact command, versions and
machine) replaces that seed's previous one; the reward-vs-KL plots are copied next to it.

    .venv/bin/python experiments/jpn_language_fix/run.py                 # seeds 0 5 6 9 10
    .venv/bin/python experiments/jpn_language_fix/run.py --seeds 11 12   # more seeds

Seeds 6, 9 and 10 are reported seeds that no tuning used; 5 (J-BOND's step count) and 0
(`make demo`'s) were.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "jpn_language_fix_tiny.yaml"
RESULTS = Path(__file__).with_name("results.md")
PLOTS = Path(__file__).with_name("plots")

# (row, evaluate stage, decoding) in the table's order.
ROWS = [
    ("SFT, sampled", "eval_sft", "sampled"),
    ("SFT, beam search", "eval_sft", "beam"),
    ("RL, plain RM", "eval_rl_plain", "sampled"),
    ("RL, one preamble RM", "eval_rl_preamble", "sampled"),
    ("RL, WARM preamble RM", "eval_rl_warm", "sampled"),
    ("J-BOND, WARM preamble RM", "eval_jbond_warm", "sampled"),
]
FIXED = ("eval_rl_warm", "eval_jbond_warm")  # the rows the targets say are fixed
PREAMBLE = (
    "eval_rl_preamble",
    *FIXED,
)  # the fix must not cost accuracy (the plain row is the control)
SFT_BAND = (0.20, 0.40)
FIXED_RATE, FIXED_UPPER = 0.01, 0.02
PLAIN_FLOOR = 0.10
ACCURACY_DROP = 0.02
PLOTTED = ("rl_plain", "rl_preamble", "rl_warm", "jbond_warm")


def run_recipe(pipeline_dir: Path, seed: int, extra: list[str] | None = None) -> str:
    """Run the recipe with every stage seeded by `seed`; returns the command line."""
    command = [sys.executable, "-m", "posttrain.cli", f"recipe={RECIPE.relative_to(ROOT)}"]
    command += [
        f"pipeline_dir={pipeline_dir}",
        f"seed={seed}",
        f"data.seed={seed}",
        f"stage.seed={seed}",
    ]
    command += ["logger=disabled", "hydra/job_logging=disabled", *(extra or [])]
    subprocess.run(command, check=True, cwd=ROOT)
    return " ".join(["posttrain", *command[3:]])


def read_evaluations(pipeline_dir: Path) -> dict[str, dict[str, Any]]:
    """Each evaluate stage's evaluation.json, by stage name."""
    return {
        stage: json.loads((pipeline_dir / stage / "evaluation.json").read_text("utf-8"))
        for stage in {stage for _, stage, _ in ROWS}
    }


def _interval(metrics: dict[str, Any], key: str) -> str:
    return (
        f"{metrics[key]:.1%} [{metrics[f'{key}_low']:.1%}, {metrics[f'{key}_high']:.1%}]"
        f" (n={metrics[f'{key}_n']})"
    )


def table(evaluations: dict[str, dict[str, Any]]) -> str:
    """The markdown table: one row per policy and decoding."""
    lines = [
        "| row | language-error rate [95% CI] | greedy | accuracy greedy / sampled | KL to SFT "
        "| reward (WARM RM) |",
        "|---|---|---|---|---|---|",
    ]
    for row, stage, decoding in ROWS:
        m = evaluations[stage]
        lines.append(
            f"| {row} | {_interval(m, f'ler_{decoding}')} | {m['ler_greedy']:.1%} | "
            f"{m['accuracy_greedy']:.1%} / {m['accuracy_sampled']:.1%} | "
            f"{m.get('kl_sampled', float('nan')):.3f} | {m.get('reward_sampled', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def gates(evaluations: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Issue 15's targets on one seed."""
    sft = evaluations["eval_sft"]
    out = {
        f"SFT sampled in [{SFT_BAND[0]:.0%}, {SFT_BAND[1]:.0%}]": SFT_BAND[0]
        <= sft["ler_sampled"]
        <= SFT_BAND[1],
        "SFT beam below SFT sampled": sft["ler_beam"] < sft["ler_sampled"],
        f"plain RM leaves >= {PLAIN_FLOOR:.0%}": evaluations["eval_rl_plain"]["ler_sampled"]
        >= PLAIN_FLOOR,
    }
    for stage in FIXED:
        m = evaluations[stage]
        out[f"{stage}: <= {FIXED_RATE:.0%}, upper <= {FIXED_UPPER:.0%}"] = (
            m["ler_sampled"] <= FIXED_RATE and m["ler_sampled_high"] <= FIXED_UPPER
        )
    for stage in PREAMBLE:
        m = evaluations[stage]
        out[f"{stage}: accuracy >= SFT - {ACCURACY_DROP:.0%}"] = all(
            m[f"accuracy_{d}"] >= sft[f"accuracy_{d}"] - ACCURACY_DROP
            for d in ("greedy", "sampled")
        )
    return out


def versions() -> str:
    """Python, the platform and the versions of the packages the numbers depend on."""
    import importlib.metadata as metadata

    names = ("jax", "flax", "optax", "orbax-checkpoint", "sentencepiece", "py3langid")
    packages = ", ".join(f"{n} {metadata.version(n)}" for n in names)
    return f"Python {platform.python_version()}, {packages}"


def machine() -> str:
    """CPU model and core count."""
    sys.path.insert(0, str(ROOT))
    from experiments.bench.common import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores"


def section(seed: int, command: str, evaluations: dict, passed: dict[str, bool], seconds: float):
    """This seed's part of results.md."""
    lines = [
        f"## Seed {seed}",
        "",
        f"{datetime.date.today()}, {machine()}, {seconds / 60:.1f} minutes.",
        f"Command: `{command}`",
        f"Versions: {versions()} (the pinned set: `constraints.txt`).",
        "",
        table(evaluations),
        "",
        "Gates: " + ", ".join(f"{name}: {'pass' if ok else 'FAIL'}" for name, ok in passed.items()),
        "",
        "Reward against KL to the SFT policy, with the SFT policy's Best-of-N curve: "
        + " ".join(f"[{stage}](plots/seed{seed}_{stage}.png)" for stage in PLOTTED),
        "",
    ]
    return "\n".join(lines)


HEADER = """# The language-error fix, tiny (issue 15)

`recipes/jpn_language_fix_tiny.yaml`, one section per seed, written by
`experiments/jpn_language_fix/run.py` (`make demo` rewrites seed 0's, `make demo SEED=n` seed
n's). Rows: the SFT policy sampled (4 replies per prompt at temperature 1) and with beam search
(width 4), then each RL policy sampled, on 256 held-out challenging Japanese prompts. Targets
(issue 15): SFT sampled in [20%, 40%]; beam below sampled; the plain reward model leaves >= 10%;
the WARM-preamble rows (REINFORCE and J-BOND) <= 1% with the 95% Wilson interval's upper end
<= 2%; every preamble row's greedy and sampled accuracy at most 2 points below SFT's.
What the numbers say so far, and what is being tried: `NOTES.md` next to this file.
"""


def update_results(seed: int, text: str) -> None:
    """Replace (or add) the seed's section of results.md, keeping the others in seed order."""
    sections = {}
    if RESULTS.exists():
        for part in RESULTS.read_text("utf-8").split("\n## Seed ")[1:]:
            number = int(re.match(r"\d+", part).group())
            sections[number] = "## Seed " + part.rstrip() + "\n"
    sections[seed] = text
    body = "\n".join(sections[s] for s in sorted(sections))
    RESULTS.write_text(HEADER + "\n" + body, "utf-8")


def copy_plots(pipeline_dir: Path, seed: int) -> None:
    """The RL stages' reward-vs-KL plots, next to results.md."""
    PLOTS.mkdir(exist_ok=True)
    for stage in PLOTTED:
        source = pipeline_dir / stage / "reward_vs_kl.png"
        if source.exists():
            shutil.copyfile(source, PLOTS / f"seed{seed}_{stage}.png")


def run_seed(
    seed: int, pipeline_dir: Path, write: bool = True, redo: list[str] | None = None
) -> tuple[str, dict[str, bool]]:
    """Run, tabulate and gate one seed (`redo`: stages of an earlier run of it to run again,
    with their dependents); returns (the table, the gates)."""
    started = time.perf_counter()
    command = run_recipe(pipeline_dir, seed, [f"redo=[{','.join(redo)}]"] if redo else None)
    evaluations = read_evaluations(pipeline_dir)
    passed = gates(evaluations)
    if write:
        update_results(
            seed, section(seed, command, evaluations, passed, time.perf_counter() - started)
        )
        copy_plots(pipeline_dir, seed)
    return table(evaluations), passed


def main() -> None:
    """Run the seeds; print each table and its gates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 5, 6, 9, 10])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "jpn_language_fix")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--redo",
        nargs="+",
        metavar="STAGE",
        help="run these stages of an earlier run again (after a recipe change that only they see)",
    )
    args = parser.parse_args()
    failed = []
    for seed in args.seeds:
        text, passed = run_seed(seed, args.runs / f"seed{seed}", redo=args.redo)
        print(f"\nseed {seed}\n{text}\n{passed}", flush=True)
        failed += [f"seed {seed}: {name}" for name, ok in passed.items() if not ok]
    if failed:
        print("targets missed: " + "; ".join(failed), flush=True)
        if args.strict:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
