"""Two processes on localhost (4 CPU devices each) form one 8-device mesh through
jax.distributed and compute the same SFT loss as one process does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from posttrain.data.sft import Rows
from posttrain.models import get_preset, init_params
from posttrain.stages.sft import sft_loss_terms

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_job_matches_one_process():
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": ""}
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), address, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["devices"] == 8 for r in results)
    assert all(r["next_step"] == 1 and r["step_devices"] == 8 for r in results)

    config = get_preset("tiny_gemma2", num_heads=8, num_kv_heads=4, hidden_dim=256)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (8, 24)).astype(np.int32)
    mask = np.zeros((8, 24), bool)
    mask[:, 12:] = True
    rows = Rows(tokens, mask, np.ones((8, 24), np.int32))
    expected_sum, expected_count = jax.jit(sft_loss_terms(config, 128))(
        init_params(config, jax.random.key(0)), rows
    )
    for result in results:
        assert result["count"] == float(expected_count)
        assert result["loss_sum"] == pytest.approx(float(expected_sum), rel=1e-5)
