"""wandb tracking: offline runs land in the run directory; disabled writes nothing."""

import pytest
from PIL import Image

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


@pytest.mark.slow
def test_a_restart_continues_the_same_wandb_run_and_logs_images(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    first = Tracker("offline", "posttrain-test", tmp_path, {})
    assert not first.resumed and first.run_dir == tmp_path
    first.log({"train/loss": 2.0}, step=1)
    first.finish()
    assert (tmp_path / "wandb_run_id").read_text().strip() == first.run_id

    png = tmp_path / "metrics.png"
    Image.new("RGB", (4, 3), "white").save(png)  # wandb.Image reads it with Pillow
    second = Tracker("offline", "posttrain-test", tmp_path, {})
    second.log({"train/loss": 1.0}, step=2)
    second.log_image("train/curves", png, step=2)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        second.log_image("train/curves", tmp_path / "missing.png", step=2)
    second.finish()
    # Offline, each start is its own directory of the same run id; `wandb sync` joins them.
    assert second.resumed and second.run_id == first.run_id
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first.run_id}*"))
    assert len(runs) == 2
    assert list(runs[1].glob("files/media/images/train/curves_2_*.png"))


def test_disabled_knows_its_run_dir_and_writes_no_run_id(tmp_path):
    tracker = Tracker("disabled", "p", tmp_path, {})
    tracker.log_image("x", tmp_path / "absent.png", step=0)  # nothing to log to: no error
    assert tracker.run_dir == tmp_path and tracker.run_id is None
    assert not (tmp_path / "wandb_run_id").exists()


class _ResumedRun:
    """What wandb.init returns online for a run whose server history ends at step 6."""

    id, disabled, starting_step = "abc123", False, 7

    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append(step)


def test_a_resumed_online_run_skips_the_steps_wandb_already_holds(tmp_path, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or _ResumedRun())
    (tmp_path / "wandb_run_id").write_text("abc123\n")
    tracker = Tracker("online", "p", tmp_path, {})
    assert (calls[0]["id"], calls[0]["resume"]) == ("abc123", "allow") and tracker.resumed
    for step in range(5, 9):  # the steps after the checkpoint at 4, repeated after the restart
        tracker.log({"train/loss": 1.0}, step)
    assert tracker.run.logged == [7, 8]
