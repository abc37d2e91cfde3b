"""The files that make a run readable: metrics.jsonl, metrics.png, summary.md/json, config.yaml."""

import json
import struct

import jax
import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from posttrain.reporting import (
    MetricsLog,
    markdown_table,
    plot_metrics,
    read_metrics,
    save_resolved_config,
    short_config,
    write_summary,
)
from posttrain.reporting._plots import numeric_series, smooth


def _steps(path):
    return [row["step"] for row in read_metrics(path)]


def test_metrics_log_lines_are_readable_before_close_and_plain_json(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(1, {"loss": np.float32(0.5), "grad_norm": jax.numpy.array(2.0), "answer": "日本語"})
    log.write(2, {"loss": float("nan"), "tokens": np.int64(7)})
    # Flushed per line: a run killed now keeps both (nothing is left in a Python buffer).
    text = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.splitlines() == [
        '{"step": 1, "loss": 0.5, "grad_norm": 2.0, "answer": "日本語"}',
        '{"step": 2, "loss": null, "tokens": 7}',  # strict JSON: NaN as null
    ]
    log.close()


def test_a_resumed_log_drops_the_steps_it_will_repeat(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in range(1, 11):
            log.write(step, {"loss": 1.0 / step})
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 11, "lo')  # the kill came mid-line

    # Resumed from the checkpoint at step 6: the first new line is step 7.
    with MetricsLog(tmp_path) as log:
        assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 11))  # nothing dropped yet
        for step in range(7, 13):
            log.write(step, {"loss": 0.5})
    assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 13))

    # Told the resume step, it trims at once.
    MetricsLog(tmp_path, resume_step=4)
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]


def test_only_process_zero_writes_run_files(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    MetricsLog(tmp_path).write(1, {"loss": 1.0})
    text = write_summary(tmp_path, "sft", {"loss": 1.0})
    save_resolved_config(tmp_path, OmegaConf.create({"a": 1}))
    assert "| loss | 1 |" in text  # every process gets the text to print
    assert list(tmp_path.iterdir()) == []


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_plot_metrics_draws_a_panel_per_changing_metric(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in range(1, 41):
            metrics = {"stage_reward": step / 40, "loss": 3.0 / step, "lr": 1e-3, "finite": 1.0}
            log.write(step, metrics | {"grad_norm": 1.0 + step % 3, "tokens_per_second": 900.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # loss first, the stage's own after the trainer's; a flat `finite` gets no panel.
    assert list(numeric_series(rows)) == [
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "stage_reward",
    ]
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert _png_size(png) == (1500, 680)  # 5 panels: 3 columns x 2 rows of 500x340 at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]
    assert _png_size(plot_metrics(tmp_path / "metrics.jsonl", png, keys=["loss"])) == (500, 340)
    with pytest.raises(KeyError, match=r"\['reward'\]"):
        plot_metrics(tmp_path / "metrics.jsonl", png, keys=["reward"])


def test_smoothing_is_debiased_at_the_start():
    assert np.allclose(smooth(np.full(5, 2.0), span=9), 2.0)  # no pull towards zero
    stepped = smooth(np.array([0.0] * 10 + [1.0] * 10), span=3)  # decay 0.5
    assert stepped[10] == pytest.approx(0.5, abs=1e-3) and stepped[11] == pytest.approx(
        0.75, abs=1e-3
    )


def test_write_summary_puts_headline_first_and_passes_tables(tmp_path):
    metrics = {
        "steps": 300,
        "eval_loss": np.float32(0.125),
        "checkpoint": "run/hf",
        "eval_samples": [["a", "b"]] * 20,  # data, not a cell
        "答え": "はい",
    }
    text = write_summary(
        tmp_path,
        "warm",
        metrics,
        headline=["eval_loss", "eval_exact_match"],
        tables={
            "members": (["model", "accuracy"], [["member0", 0.5], ["WARM", 0.75]]),
            "note": "x",
        },
    )
    assert text == (
        f"## warm: {tmp_path}\n\n"
        "| metric | value |\n|---|---|\n"
        "| eval_loss | 0.125 |\n| eval_exact_match | — |\n| steps | 300 |\n"
        "| checkpoint | run/hf |\n| 答え | はい |\n\n"
        "### members\n\n| model | accuracy |\n|---|---:|\n| member0 | 0.5 |\n| WARM | 0.75 |\n\n"
        "### note\n\nx\n"
    )
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == text
    raw = (tmp_path / "summary.json").read_text(encoding="utf-8")
    assert '"答え": "はい"' in raw  # unescaped
    summary = json.loads(raw)
    assert summary["headline"] == ["eval_loss", "eval_exact_match"]
    assert (
        summary["metrics"]["eval_loss"] == 0.125 and len(summary["metrics"]["eval_samples"]) == 20
    )
    assert summary["tables"]["members"]["rows"][1] == ["WARM", 0.75]


def test_markdown_table_escapes_cells_and_checks_rows():
    assert markdown_table(["a"], [["x|y\nz"], [1e-5], [123456.0], [float("inf")]]).splitlines()[
        2:
    ] == [
        "| x\\|y z |",
        "| 1.000e-05 |",
        "| 123456 |",
        "| inf |",
    ]
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [3]])


def _config():
    return OmegaConf.create(
        {
            "stage": {
                "name": "sft",
                "steps": 300,
                "preamble": "言語 を判定",
                "sampling": {"t": 0.7},
            },
            "optim": {"lr": 0.003, "warmup": "${stage.steps}"},
            "data": {"train": "???"},
            "run_dir": "${hydra:runtime.output_dir}",  # Hydra is not running here
        }
    )


def test_save_resolved_config_writes_plain_resolved_yaml(tmp_path):
    path = save_resolved_config(tmp_path, _config())
    text = path.read_text(encoding="utf-8")
    assert "言語 を判定" in text and "???" not in text
    assert yaml.safe_load(text) == {
        "stage": {"name": "sft", "steps": 300, "preamble": "言語 を判定", "sampling": {"t": 0.7}},
        "optim": {"lr": 0.003, "warmup": 300},
        "data": {"train": None},
        "run_dir": "${hydra:runtime.output_dir}",
    }


def test_short_config_shows_the_stage_and_the_overrides():
    overrides = ["model=tiny_gemma2", "optim.lr=3e-3", "+extra=1", "stage.steps=300"]
    assert short_config(_config(), overrides=overrides) == (
        'stage: name=sft steps=300 preamble="言語 を判定" sampling.t=0.7\n'
        "overrides: model=tiny_gemma2 optim.lr=0.003 +extra=1 stage.steps=300"
    )
    lines = short_config(_config(), keep=["stage", "optim"], overrides=[], width=40).splitlines()
    assert lines == [
        "stage: name=sft steps=300",
        '    preamble="言語 を判定" sampling.t=0.7',
        "optim: lr=0.003 warmup=300",
    ]
    assert all(len(line) <= 40 for line in lines)
    with pytest.raises(KeyError, match="no section 'model'"):
        short_config(_config(), keep=["model"], overrides=[])
