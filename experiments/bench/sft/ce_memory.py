"""Peak temporary memory of the cross-entropy, full logits vs vocabulary chunks.

Compiled (not run) on abstract shapes, so a Gemma-sized vocabulary costs nothing here: XLA's
memory analysis reports the temporary buffers of loss + gradient for hidden states
[tokens, d] and the tied embedding [256000, d] in float32.

    .venv/bin/python experiments/bench/sft/ce_memory.py
"""

from __future__ import annotations

import datetime
from pathlib import Path

import jax
import jax.numpy as jnp

from posttrain.losses import chunked_token_log_probs

VOCAB, WIDTH = 256_000, 2304  # Gemma 2 2B
RESULTS = Path(__file__).with_name("RESULTS_ce_memory.md")


def full_loss(hidden, embedding, targets):
    """Mean NLL through materialised float32 logits [tokens, vocab]."""
    logits = jnp.einsum("nd,vd->nv", hidden, embedding, preferred_element_type=jnp.float32)
    logits = 30.0 * jnp.tanh(logits / 30.0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))


def chunked_loss(hidden, embedding, targets, chunk_size):
    """Mean NLL with the vocabulary swept in chunks."""
    return -jnp.mean(chunked_token_log_probs(hidden, embedding, targets, VOCAB, 30.0, chunk_size))


def temp_bytes(fn, tokens: int) -> int:
    """Temporary bytes of the compiled loss-and-gradient."""
    args = (
        jax.ShapeDtypeStruct((tokens, WIDTH), jnp.float32),
        jax.ShapeDtypeStruct((VOCAB, WIDTH), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    """Print and write the table."""
    lines = [
        f"## {datetime.date.today().isoformat()} — XLA CPU memory analysis, float32, V={VOCAB}, d={WIDTH}",
        "",
        "Loss + gradient w.r.t. hidden states and embedding; temporary buffers only (inputs and",
        "outputs excluded). Command: `.venv/bin/python experiments/bench/sft/ce_memory.py`",
        "",
        "| tokens | full logits | chunked, 8192 | chunked, 32768 | saving (8192) |",
        "|---|---|---|---|---|",
    ]
    for tokens in (1024, 4096):
        full = temp_bytes(full_loss, tokens)
        small = temp_bytes(lambda h, e, t: chunked_loss(h, e, t, 8192), tokens)
        large = temp_bytes(lambda h, e, t: chunked_loss(h, e, t, 32768), tokens)
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        lines.append(
            f"| {tokens} | {gib(full)} | {gib(small)} | {gib(large)} | {full / small:.1f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text("# Cross-entropy memory: full logits vs vocabulary chunks\n\n" + text)


if __name__ == "__main__":
    main()
