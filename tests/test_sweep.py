"""Sweeps: job directories named by their swept values; one table of every job's result."""

import json
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from posttrain.sweep import SUBDIR, SweepTable, safe_dirname, sweep_subdir_overrides

SUBDIR_OVERRIDE = f"hydra.sweep.subdir='{SUBDIR}'"


@pytest.mark.parametrize(
    ("argv", "excluded"),
    [
        (["-m", "stage=sft", "optim.lr=1e-3,3e-3", "data.train=a/b.jsonl"], "'data.train','stage'"),
        (
            ["--multirun", "seed=range(0,3)", "+extra.key=1", "--config-name", "config"],
            "'extra.key'",
        ),
        (["-m", "model=glob(tiny*)", "stage.steps=choice(10,20)", "hydra/launcher=slurm"], ""),
        (["hydra.mode=MULTIRUN", "optim.lr=1,2", "~stage.unused"], "'stage.unused'"),
    ],
)
def test_sweep_subdir_overrides_excludes_the_keys_that_do_not_sweep(argv, excluded):
    # hydra/launcher is Hydra's own override: never part of a job's name, never excluded.
    assert sweep_subdir_overrides(argv) == [
        SUBDIR_OVERRIDE,
        f"hydra.job.config.override_dirname.exclude_keys=[{excluded}]",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["stage=sft", "optim.lr=1e-3,3e-3"],  # no -m: a list value, not a sweep
        ["-m", "stage=sft", "optim.lr=1e-3"],  # nothing sweeps
        ["-m", "optim.lr=1,2", "hydra.sweep.subdir=mine"],  # the user's own naming wins
        ["-m", "stage.layers=[1,2]"],  # a list is one value
        ["--help"],
    ],
)
def test_sweep_subdir_overrides_leaves_other_command_lines_alone(argv):
    assert sweep_subdir_overrides(argv) == []


def test_safe_dirname_keeps_one_short_path_component():
    assert safe_dirname("data.train=in/a b.jsonl,lr=1e-3") == "data.train=in_a_b.jsonl,lr=1e-3"
    long = safe_dirname("stage.preamble=" + "日本語" * 100)
    # 15 ASCII bytes + 61 three-byte characters = 198; a 62nd would pass 200, so it is cut whole.
    assert long == "stage.preamble=" + ("日本語" * 100)[:61]


def _job(sweep_dir, name, overrides, files):
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    for filename, content in files.items():
        (job / filename).write_text(json.dumps(content, ensure_ascii=False))


def test_sweep_table_has_a_row_per_job_with_swept_values_and_headline_metrics(tmp_path, capsys):
    # Given four jobs of `optim.lr=0.1,0.3 seed=0,1`: two with a summary, one with only the
    # metrics.json of an older stage, one that left nothing (still running or failed).
    sweep_dir = tmp_path / "multirun"
    summary = {"stage": "sft", "headline": ["eval_loss", "eval_exact_match"]}
    _job(sweep_dir, "0_lr", ["stage=sft", "optim.lr=0.1", "seed=0"], {
        "summary.json": summary | {"metrics": {"eval_loss": 0.5, "eval_exact_match": 0.25, "steps": 3}}
    })  # fmt: skip
    _job(sweep_dir, "1_lr", ["stage=sft", "optim.lr=0.1", "seed=1"], {
        "summary.json": summary | {"metrics": {"eval_loss": 0.25, "eval_exact_match": 0.5, "steps": 3}}
    })  # fmt: skip
    _job(sweep_dir, "2_lr", ["stage=sft", "optim.lr=0.3", "seed=0"], {
        "metrics.json": {"eval_loss": 0.125, "steps": 3}
    })  # fmt: skip
    _job(sweep_dir, "10_lr", ["stage=sft", "optim.lr=0.3", "seed=1"], {})
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": ["optim.lr=0.1,0.3"]}}}
    )

    # When the multirun ends
    SweepTable().on_multirun_end(config)

    # Then one table, jobs in number order (10 after 2), columns from the sweep's command line
    table = textwrap.dedent("""\
        | job | optim.lr | eval_loss | eval_exact_match | status |
        |---:|---|---|---|---|
        | 0 | 0.1 | 0.5 | 0.25 | finished |
        | 1 | 0.1 | 0.25 | 0.5 | finished |
        | 2 | 0.3 | 0.125 | — | finished |
        | 10 | 0.3 | — | — | no metrics |
    """)
    assert (sweep_dir / "sweep.md").read_text() == f"# sweep {sweep_dir}\n\n{table}"
    assert table in capsys.readouterr().out


def test_sweep_table_without_headlines_shows_the_metrics_that_differ(tmp_path):
    sweep_dir = tmp_path / "multirun"
    for index, lr in enumerate(["0.1", "0.3"]):
        metrics = {"steps": 3, "loss": 1.0 / (index + 1), "accuracy": 0.5 + index / 4, "ok": True}
        _job(sweep_dir, str(index), [f"optim.lr={lr}", "seed=0"], {"metrics.json": metrics})
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": []}}}
    )

    SweepTable().on_multirun_end(config)

    # optim.lr is found as the override that differs; steps (equal everywhere) is left out
    assert (sweep_dir / "sweep.md").read_text().splitlines()[2:] == [
        "| job | optim.lr | loss | accuracy |",
        "|---:|---|---:|---:|",
        "| 0 | 0.1 | 1 | 0.5 |",
        "| 1 | 0.3 | 0.5 | 0.75 |",
    ]


def test_sweep_table_needs_job_directories(tmp_path):
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": []}}}
    )
    with pytest.raises(FileNotFoundError, match=r"no Hydra job directories"):
        SweepTable().on_multirun_end(config)


APP = """
import sys

import hydra

from posttrain.reporting import write_summary
from posttrain.sweep import sweep_subdir_overrides


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg):
    write_summary(cfg.run_dir, "toy", {"score": cfg.lr * len(cfg.tag), "n": 1}, headline=["score"])


if __name__ == "__main__":
    sys.argv += sweep_subdir_overrides(sys.argv[1:])
    main()
"""

CONFIG = """
lr: 0.1
tag: none
run_dir: ${hydra:runtime.output_dir}
hydra:
  sweep:
    dir: multirun/${now:%H-%M-%S-%f}  # microseconds: the callback must see the jobs' own dir
  callbacks:
    sweep_table:
      _target_: posttrain.sweep.SweepTable
"""


def test_a_real_multirun_names_jobs_by_swept_values_and_writes_one_table(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "config.yaml").write_text(CONFIG)
    result = subprocess.run(
        [sys.executable, "app.py", "-m", "tag=in/a,in/bb", "lr=0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    # The fixed lr is left out of the names, the swept path made one directory name.
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "0_tag=in_a",
        "1_tag=in_bb",
    ]
    table = "| job | tag | score |\n|---:|---|---:|\n| 0 | in/a | 2 |\n| 1 | in/bb | 2.5 |\n"
    assert (sweep_dir / "sweep.md").read_text().endswith(table)
    assert table in result.stdout
