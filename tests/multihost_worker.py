"""One process of the two-process multi-host test (run by tests/test_multihost.py)."""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from posttrain.models import get_preset, init_params, param_logical_axes  # noqa: E402
from posttrain.sharding import (  # noqa: E402
    MeshConfig,
    activation_sharding,
    initialize_distributed,
    logical_to_spec,
    make_mesh,
    place_on_mesh,
    tree_shardings,
)
from posttrain.stages.sft import sft_loss_terms  # noqa: E402


def main() -> None:
    """Join the job, shard params and this host's half of the batch, print the global loss."""
    address, process_id = sys.argv[1], int(sys.argv[2])
    initialize_distributed(address, num_processes=2, process_id=process_id)
    config = get_preset("tiny_gemma2", num_heads=8, num_kv_heads=4, hidden_dim=256)
    params = init_params(config, jax.random.key(0))  # same seed: same values on every host
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    shardings = tree_shardings(param_logical_axes(config), params, mesh)
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x)[index]),
        params,
        shardings,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (8, 24)).astype(np.int32)
    mask = np.zeros((8, 24), bool)
    mask[:, 12:] = True
    segments = np.ones((8, 24), np.int32)
    local = slice(4 * process_id, 4 * process_id + 4)  # this host's rows of the global batch

    def global_array(x):
        spec = logical_to_spec(("act_batch", None), x.shape, mesh)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x[local])

    batch = tuple(global_array(x) for x in (tokens, mask, segments))
    with activation_sharding(mesh):
        loss_sum, count = jax.jit(sft_loss_terms(config, 128))(params, batch)
    # The SFT stage replicates counters over the mesh before its first step; across hosts too.
    step = place_on_mesh(jax.numpy.zeros((), jax.numpy.int32), mesh)
    next_step = int(jax.jit(lambda s: s + 1)(step))
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "loss_sum": float(loss_sum), "count": float(count),
                      "next_step": next_step, "step_devices": len(step.sharding.device_set)}))  # fmt: skip


if __name__ == "__main__":
    main()
