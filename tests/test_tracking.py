"""wandb tracking: offline runs land in the run directory; disabled writes nothing."""

import pytest

from posttrain.tracking import Tracker


@pytest.mark.slow
def test_offline_run_lands_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the test session disables wandb globally
    tracker = Tracker("offline", "posttrain-test", tmp_path, {"optim": {"lr": 1e-3}}, group="g")
    tracker.log({"train/loss": 1.5}, step=1)
    tracker.log_table("samples", ["prompt", "answer"], [["a", "b"]], step=1)
    assert tracker.run.config["optim"]["lr"] == 1e-3
    tracker.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_disabled_writes_nothing(tmp_path):
    tracker = Tracker("disabled", "p", tmp_path, {})
    tracker.log({"x": 1.0}, step=0)
    tracker.finish()
    assert not (tmp_path / "wandb").exists()


def test_unknown_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.mode"):
        Tracker("offlin", "p", tmp_path, {})
