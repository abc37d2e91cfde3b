"""`make demo`: the smallest end-to-end run of the backbone on a fresh machine.

1. Generate English/Japanese text and train a sentencepiece tokenizer with Gemma's special ids.
2. Build a tiny random Gemma 2, export it as a Hugging Face directory and load it back.
3. If `transformers` is installed (the test extra), check it gives the same logits.
4. Greedy-decode a chat prompt with the KV-cache sampler, checking each step against the
   full forward.

The weights are random, so the decoded text is noise; the point is that every piece agrees.
Until the SFT stage lands this is the project's main job.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.checkpoints import load_hf_model, save_hf
from posttrain.data.synthetic import bilingual_corpus
from posttrain.models import forward, get_preset, init_params
from posttrain.sampling import SamplingConfig, sample
from posttrain.tokenizer import GemmaTokenizer, train_tokenizer


def transformers_logits(directory: Path, tokens: np.ndarray) -> np.ndarray | None:
    """Logits of the exported directory under transformers, or None if it is not installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.as_tensor(tokens)).logits.numpy()


def greedy_decode(config, params, prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens after `prompt` from the KV-cache sampler, and how many of them were checked
    against the argmax of a full forward over the sequence so far."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    out = sample(config, params, [prompt], greedy)
    generated = [int(t) for t in out.tokens[0, : int(out.lengths[0])]]
    full_forward = jax.jit(functools.partial(forward, config))
    for t, token in enumerate(generated):
        sequence = jnp.asarray([prompt + generated[:t]], jnp.int32)
        if token != int(jnp.argmax(full_forward(params, sequence)[0, -1])):
            raise AssertionError(f"cached decoding diverged from the full forward at step {t}")
    return generated, len(generated)


def main() -> None:
    """Run the demo and print what it checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="posttrain-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] training a sentencepiece tokenizer on synthetic EN/JA text in {workdir}")
    model_file = train_tokenizer(bilingual_corpus(3000, seed=0), workdir / "tokenizer", 1024)
    tokenizer = GemmaTokenizer(model_file)
    print(f"      vocab {tokenizer.vocab_size}, <start_of_turn>=106, <end_of_turn>=107 checked")

    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    params = init_params(config, jax.random.key(0))
    print(
        f"[2/4] tiny Gemma 2: {config.num_layers} layers, d={config.embed_dim}, window {config.sliding_window}"
    )
    hf_dir = save_hf(config, params, workdir / "hf")
    model = load_hf_model(hf_dir)
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "12 たす 7 はいくつですか？"}], add_generation_prompt=True
    )
    tokens = np.asarray([prompt])
    ours = np.asarray(model(tokens))
    reloaded_diff = np.abs(ours - np.asarray(forward(config, params, jnp.asarray(tokens)))).max()
    print(f"      exported to {hf_dir} and reloaded: max |logit diff| {reloaded_diff:.1e}")

    reference = transformers_logits(hf_dir, tokens)
    if reference is None:
        print("[3/4] transformers not installed: parity check skipped")
    else:
        diff = np.abs(ours - reference).max()
        print(
            f"[3/4] transformers on the same directory: max |logit diff| {diff:.2e} (T={len(prompt)})"
        )
        if diff > 1e-4:
            raise SystemExit(f"parity with transformers failed: {diff}")

    generated, checked = greedy_decode(config, model.params, prompt, max_new_tokens=24)
    print(f"[4/4] greedy decode with the KV cache: {checked} steps equal the full forward's argmax")
    print(f"      prompt : {tokenizer.decode(prompt)!r}")
    print(f"      reply  : {tokenizer.decode(generated)!r}  (random weights: noise is expected)")


if __name__ == "__main__":
    main()
