"""The `sample` stage: continuations of a prompt set from a checkpoint, written as JSONL.

One line per sample: prompt, response, log_prob (sum over the response under the unmodified
model), num_tokens, finished, and reward when one is given (a rule name or a reward spec of
`posttrain.rewards.api`: reward models, WARM averages, ensembles, weighted sums, an offset).
Methods: plain sampling
(`num_samples` per prompt), beam search (the best beam), or Best-of-N (the best of
`num_samples` by the reward).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from posttrain.checkpoints import load_hf
from posttrain.data.prompts import load_prompts
from posttrain.rewards.api import RewardFunction, reward_from_config, score_responses
from posttrain.sampling import SamplingConfig, beam_search, best_of_n, sample
from posttrain.sampling.prompting import encode_prompt, prompt_text
from posttrain.stages.kit import StageContext
from posttrain.stages.registry import register_stage
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID, GemmaTokenizer

METHODS = ("sample", "beam", "best_of_n")


def _check(stage: DictConfig) -> None:
    if stage.method not in METHODS:
        raise ValueError(f"stage.method={stage.method!r}; expected one of {METHODS}")
    if stage.method == "best_of_n" and stage.reward is None:
        raise ValueError("stage.method=best_of_n needs stage.reward (a rule or a reward model)")
    if stage.batch_size < 1 or stage.num_samples < 1:
        raise ValueError("stage.batch_size and stage.num_samples must be >= 1")


def build_reward(stage: DictConfig, tokenizer: str) -> RewardFunction | None:
    """The stage's reward function (rule name or reward spec), built before any sampling."""
    if stage.reward is None:
        return None
    spec = stage.reward
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    return reward_from_config(spec, tokenizer)


@register_stage("sample", headline=("mean_reward", "num_rows", "tokens_per_second"))
def run(ctx: StageContext) -> dict[str, Any]:
    """Run the stage; returns its metrics."""
    stage = ctx.cfg.stage
    _check(stage)
    settings = SamplingConfig(
        max_new_tokens=stage.sampling.max_new_tokens,
        temperature=stage.sampling.temperature,
        top_k=stage.sampling.top_k,
        top_p=stage.sampling.top_p,
        stop_ids=(EOS_ID, END_OF_TURN_ID),
        seed=stage.sampling.seed,
    )
    tokenizer = ctx.tokenizer(stage.tokenizer, stage.checkpoint)
    config, params = load_hf(stage.checkpoint)
    ctx.check_vocab(config, tokenizer, stage.checkpoint)
    prompts = load_prompts(stage.prompts, stage.prompt_column, stage.split)
    reward = build_reward(stage, str(tokenizer.model_file))

    output = Path(stage.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    rows_written, generated_tokens, rewards, log_probs = 0, 0, [], []
    started = time.perf_counter()
    with tmp.open("w", encoding="utf-8") as sink, tqdm(total=len(prompts), desc="sample") as bar:
        for start in range(0, len(prompts), stage.batch_size):
            batch = prompts[start : start + stage.batch_size]
            ids = [encode_prompt(tokenizer, prompt, stage.chat) for prompt in batch]
            # One random stream per batch, reproducible from the seed and the batch position.
            rng = jax.random.fold_in(jax.random.key(settings.seed), start)
            rows = _generate(stage, config, params, tokenizer, batch, ids, settings, reward, rng)
            for row in rows:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                generated_tokens += row["num_tokens"]
                log_probs.append(row["log_prob"])
                if "reward" in row:
                    rewards.append(row["reward"])
            rows_written += len(rows)
            batch_rewards = [row["reward"] for row in rows if "reward" in row]
            ctx.metrics_log.write(
                start // stage.batch_size + 1,
                dict(
                    rows=rows_written,
                    tokens_per_second=generated_tokens / (time.perf_counter() - started),
                    mean_log_prob=float(np.mean([row["log_prob"] for row in rows])),
                    **({"mean_reward": float(np.mean(batch_rewards))} if batch_rewards else {}),
                ),
            )
            bar.update(len(batch))
            bar.set_postfix(tok_per_s=f"{generated_tokens / (time.perf_counter() - started):.0f}")
    tmp.replace(output)  # the output appears whole or not at all
    seconds = time.perf_counter() - started
    metrics = dict(
        num_prompts=len(prompts),
        num_rows=rows_written,
        generated_tokens=generated_tokens,
        tokens_per_second=generated_tokens / seconds,
        mean_log_prob=float(np.mean(log_probs)),
        output=str(output),
    )
    if rewards:
        metrics["mean_reward"] = float(np.mean(rewards))
    metrics["examples"] = _examples(output, 5)
    return ctx.finish(metrics)


def _examples(output: Path, count: int) -> list[dict[str, Any]]:
    with output.open(encoding="utf-8") as rows:
        return [json.loads(line) for line, _ in zip(rows, range(count), strict=False)]


def _generate(
    stage: DictConfig,
    config,
    params,
    tokenizer: GemmaTokenizer,
    prompts: Sequence[Any],
    ids: list[list[int]],
    settings: SamplingConfig,
    reward: RewardFunction | None,
    rng: jax.Array,
) -> list[dict[str, Any]]:
    """One batch of prompts -> output rows (rewarded, when a reward is given)."""
    rows = _sample_rows(stage, config, params, tokenizer, prompts, ids, settings, reward, rng)
    prompt_index = [row.pop("_prompt") for row in rows]
    # Best-of-N rows carry the reward they were chosen by; the others are scored here.
    if reward is not None and any("reward" not in row for row in rows):
        responses = [r["response"] for r in rows]
        scores = score_responses(reward, [prompts[i] for i in prompt_index], responses)
        for row, score in zip(rows, scores, strict=True):
            row["reward"] = float(score)
    return rows


def _sample_rows(stage, config, params, tokenizer, prompts, ids, settings, reward, rng) -> list:
    """Rows of the chosen method, each with the index of its prompt under `_prompt`."""
    texts = [prompt_text(prompt) for prompt in prompts]

    def row(index: int, tokens: np.ndarray, length: int, log_prob: float, finished: bool) -> dict:
        response_ids = [int(t) for t in tokens[:length] if int(t) not in (EOS_ID, END_OF_TURN_ID)]
        response = tokenizer.decode(response_ids)
        out = dict(
            prompt=texts[index],
            response=response,
            log_prob=float(log_prob),
            num_tokens=int(length),
            finished=bool(finished),
            _prompt=index,
        )
        return out

    if stage.method == "beam":
        beams = beam_search(
            config,
            params,
            ids,
            width=stage.beam_width,
            max_new_tokens=settings.max_new_tokens,
            alpha=stage.length_penalty,
            stop_ids=settings.stop_ids,
        )
        tokens, lengths = np.asarray(beams.tokens[:, 0]), np.asarray(beams.lengths[:, 0])
        stops = np.isin(tokens[np.arange(len(ids)), np.maximum(lengths - 1, 0)], settings.stop_ids)
        return [
            row(i, tokens[i], lengths[i], float(beams.log_probs[i, 0]), stops[i])
            for i in range(len(ids))
        ]

    if stage.method == "best_of_n":
        pool = best_of_n(
            config,
            params,
            tokenizer,
            prompts,
            stage.num_samples,
            reward,
            settings,
            rng,
            chat=stage.chat,
        )
        rows = []
        for i in range(len(ids)):
            best = pool.best_index[i]
            length = int(pool.pool_lengths[i, best])
            finished = length > 0 and int(pool.best_tokens[i, length - 1]) in settings.stop_ids
            rows.append(
                row(i, pool.best_tokens[i], length, pool.pool_model_log_probs[i, best], finished)
                | {"reward": float(pool.best_rewards[i])}
            )
        return rows

    repeated = [p for p in ids for _ in range(stage.num_samples)]
    out = sample(config, params, repeated, settings, rng)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    totals = np.asarray(out.model_log_probs).sum(-1)
    return [
        row(j // stage.num_samples, tokens[j], lengths[j], totals[j], bool(out.finished[j]))
        for j in range(len(repeated))
    ]
