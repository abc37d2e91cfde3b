"""Issue 14's tiny-Gemma acceptance, seed 0 of `experiments/rl_tiny` with the same gates:
REINFORCE raises a rule reward with bounded KL; J-BOND stays near the Best-of-N curve."""

import pytest


@pytest.mark.slow
def test_reinforce_and_jbond_on_a_tiny_gemma(tmp_path):
    from experiments.rl_tiny.run import gates, run_seed

    result = run_seed(0, tmp_path)
    failed = [name for name, ok in gates(result).items() if not ok]
    assert not failed, (failed, result)
