"""Issue 15's tiny acceptance, seed 0 of `experiments/jpn_language_fix` with the same gates: the
SFT policy's sampled language-error rate in [20%, 40%], beam below sampled, the plain reward
model leaving >= 10%, the WARM-preamble RL and J-BOND rows <= 1% (upper end <= 2%) with accuracy
within 2 points of SFT. The recipe is the one `make demo` runs (8-12 minutes, host by host), so
the suite starts it first."""

import json

import pytest


@pytest.mark.slow(minutes=8)
def test_language_fix_recipe_meets_its_targets(tmp_path, monkeypatch):
    # The recipe runs as `make demo` does, on one CPU device: the suite's 8 simulated devices
    # split XLA's thread pool and change float reduction orders (seed 0's J-BOND row: 1.6%
    # against 1.3%).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    from experiments.jpn_language_fix.run import PLOTTED, ROWS, gates, read_evaluations, run_seed

    table, passed = run_seed(0, tmp_path, write=False)
    failed = [name for name, ok in passed.items() if not ok]
    assert not failed, (failed, table)
    assert gates(read_evaluations(tmp_path)) == passed
    # Every RL run drew its reward-vs-KL plot with the SFT policy's Best-of-N curve.
    for stage in PLOTTED:
        assert (tmp_path / stage / "reward_vs_kl.png").stat().st_size > 0, stage
        assert len(json.loads((tmp_path / stage / "bon_curve.json").read_text())["reward"]) > 1
    for _, stage, _ in ROWS:
        assert (tmp_path / stage / "language_error.png").exists(), stage
    assert table.count("\n") == len(ROWS) + 1
