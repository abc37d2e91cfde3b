"""`make demo`: the project's main job on a fresh machine, in about a minute of CPU.

Runs `recipes/tiny_sft.yaml` (synthetic EN/JA task + tokenizer -> SFT of a tiny Gemma 2 ->
greedy sampling), prints held-out exact match and a few answers, then checks that the trained
checkpoint gives the same logits under `transformers` (when the test extra is installed).
Until the language-fix recipe lands this is the main job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_sft.yaml"


def transformers_parity(checkpoint: Path, tokens: np.ndarray) -> float | None:
    """Max |logit difference| between posttrain and transformers on a checkpoint, or None."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from posttrain.checkpoints import load_hf_model

    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = reference.eval()(torch.as_tensor(tokens)).logits.numpy()
    return float(np.abs(np.asarray(load_hf_model(checkpoint)(tokens)) - expected).max())


def main() -> None:
    """Run the tiny pipeline and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-dir", type=Path, default=None, help="keep outputs here")
    args = parser.parse_args()
    pipeline_dir = args.pipeline_dir or Path(tempfile.mkdtemp(prefix="posttrain-demo-"))
    command = [sys.executable, "-m", "posttrain.cli", f"recipe={RECIPE}"]
    command += [f"pipeline_dir={pipeline_dir}", "logger=disabled", "hydra/job_logging=disabled"]
    subprocess.run(command, check=True)

    sft = json.loads((pipeline_dir / "sft" / "metrics.json").read_text())
    samples = [
        json.loads(line)
        for line in (pipeline_dir / "sample" / "samples.jsonl").read_text("utf-8").splitlines()
    ]
    expected = {
        row["prompt"]: row["response"]
        for row in map(
            json.loads, (pipeline_dir / "data" / "eval.jsonl").read_text("utf-8").splitlines()
        )
    }
    correct = np.mean([s["response"].strip() == expected[s["prompt"]] for s in samples])
    print("\n| tiny SFT pipeline (reverse the digits, EN/JA) | value |")
    print("|---|---|")
    print(f"| SFT steps | {sft['steps']} |")
    print(f"| held-out loss / perplexity | {sft['eval_loss']:.4f} / {sft['eval_perplexity']:.4f} |")
    print(f"| held-out exact match (sft stage, greedy) | {sft['eval_exact_match']:.3f} |")
    print(f"| exact match of the sample stage's JSONL | {correct:.3f} ({len(samples)} prompts) |")
    print("\n| prompt | answer |\n|---|---|")
    for row in samples[:4]:
        print(f"| {row['prompt']} | {row['response']} |")

    from posttrain.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer(pipeline_dir / "data" / "tokenizer.model")
    chat = [{"role": "user", "content": samples[0]["prompt"]}]
    tokens = np.asarray([tokenizer.encode_chat(chat, add_generation_prompt=True)])
    diff = transformers_parity(Path(sft["checkpoint"]), tokens)
    if diff is None:
        print("\ntransformers not installed: logit parity check skipped")
    else:
        print(f"\nSFT checkpoint under transformers: max |logit diff| {diff:.2e}")
        if diff > 1e-4:
            raise SystemExit(f"parity with transformers failed: {diff}")
    print(f"outputs: {pipeline_dir}")


if __name__ == "__main__":
    main()
