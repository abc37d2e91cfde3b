"""The SLURM launcher is a config option that composes (nothing is submitted)."""

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from posttrain.cli import CONF_DIR


def test_slurm_launcher_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 8
    GlobalHydra.instance().clear()
