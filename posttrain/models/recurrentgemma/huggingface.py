"""Hugging Face RecurrentGemma directories: load into our (official-layout) tree, export from it.

Reads `config.json` and safetensors only (never pickles). The tensor mapping is
`shared/design/backbone.md` §3.4. Two HF conventions to undo: `intermediate_size` is twice the
MLP branch width, and `attention_window_size` counts the keys a query sees itself included,
where the checkpoints were trained seeing one more (see `RecurrentGemmaConfig.window_semantics`).
Export records the semantics in config.json under `posttrain_window_semantics` (transformers
ignores the unknown key) and loading reads it back; a directory without it (one transformers
wrote) loads as "official" unless told otherwise.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from posttrain.checkpoints.huggingface import (
    CheckpointError,
    read_hf_config,
    read_safetensors,
    write_hf_directory,
)
from posttrain.models.recurrentgemma.config import RecurrentGemmaConfig, WindowSemantics

Params = dict[str, Any]

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_tanh")
# Our own config.json key: which window semantics the exported weights were trained with.
WINDOW_SEMANTICS_KEY = "posttrain_window_semantics"


def config_from_hf(
    hf: dict[str, Any], window_semantics: WindowSemantics | None = None, dtype: str | None = None
) -> RecurrentGemmaConfig:
    """Translate a transformers RecurrentGemma `config.json` dict (`window_semantics`: None
    reads the exported key, "official" without one)."""
    if hf.get("model_type") != "recurrent_gemma":
        raise CheckpointError(
            f"config.json model_type={hf.get('model_type')!r}, expected 'recurrent_gemma'"
        )
    required = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    )
    missing = [key for key in required if key not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks required fields {missing}")
    activation = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in _TANH_GELUS:
        raise CheckpointError(f"activation {activation!r} is not RecurrentGemma's tanh GELU")
    if hf.get("attention_bias", False):
        raise CheckpointError(
            "attention_bias=True: RecurrentGemma's q/k/v projections have no bias"
        )
    # transformers defaults a missing num_key_value_heads to num_attention_heads.
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if kv_heads != 1:
        raise CheckpointError(f"num_key_value_heads={kv_heads}: RecurrentGemma is multi-query (1)")
    if hf["intermediate_size"] % 2:
        raise CheckpointError(
            f"intermediate_size={hf['intermediate_size']} must be 2 x the MLP width"
        )
    rope = hf.get("rope_parameters") or {}
    # No `scale_embeddings` field is read: transformers scales by the bf16 sqrt(d) always.
    stored_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype or (stored_dtype if stored_dtype in _NP_DTYPES else "float32")
    cap = hf.get("logits_soft_cap", 30.0)
    if window_semantics is None:
        window_semantics = hf.get(WINDOW_SEMANTICS_KEY, "official")
        if window_semantics not in ("official", "hf"):
            raise CheckpointError(
                f"config.json {WINDOW_SEMANTICS_KEY}={window_semantics!r}, expected "
                "'official' or 'hf'"
            )
    return RecurrentGemmaConfig(
        num_layers=hf["num_hidden_layers"],
        width=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        lru_width=hf.get("lru_width") or hf["hidden_size"],
        mlp_width=hf["intermediate_size"] // 2,
        vocab_size=hf["vocab_size"],
        conv_width=hf.get("conv1d_width", 4),
        attention_window=hf.get("attention_window_size", 2048),
        window_semantics=window_semantics,
        block_pattern=tuple(hf.get("block_types") or ("recurrent", "recurrent", "attention")),
        logit_softcap=cap or None,
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rope_fraction=float(
            rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        ),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        dtype=dtype,
        param_dtype=dtype,
    )


def config_to_hf(config: RecurrentGemmaConfig, dtype: str) -> dict[str, Any]:
    """A transformers `config.json` dict (the window is written as configured: W, and its
    semantics under our own key)."""
    if not config.scale_embeddings:
        raise CheckpointError("transformers always scales the embeddings by sqrt(width)")
    rope = {
        "rope_theta": config.rope_base,
        "rope_type": "default",
        "partial_rotary_factor": config.rope_fraction,
    }
    return dict(
        architectures=["RecurrentGemmaForCausalLM"],
        model_type="recurrent_gemma",
        num_hidden_layers=config.num_layers,
        hidden_size=config.width,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        lru_width=config.lru_width,
        intermediate_size=2 * config.mlp_width,
        vocab_size=config.vocab_size,
        conv1d_width=config.conv_width,
        attention_window_size=config.attention_window,
        **{WINDOW_SEMANTICS_KEY: config.window_semantics},
        block_types=list(config.block_pattern),
        logits_soft_cap=config.logit_softcap or 0.0,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        rope_theta=config.rope_base,
        partial_rotary_factor=config.rope_fraction,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        dtype=dtype,
        torch_dtype=dtype,
    )


def expected_hf_shapes(config: RecurrentGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config holds, with its shape."""
    d, lw, f, n, h, k = (
        config.width,
        config.lru_width,
        config.mlp_width,
        config.num_heads,
        config.head_dim,
        config.conv_width,
    )
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.final_norm.weight": (d,)}
    for i, kind in enumerate(config.block_types):
        p = f"model.layers.{i}."
        shapes |= {p + "temporal_pre_norm.weight": (d,), p + "channel_pre_norm.weight": (d,)}
        for name in ("gate_proj", "up_proj"):
            shapes |= {p + f"mlp_block.{name}.weight": (f, d), p + f"mlp_block.{name}.bias": (f,)}
        shapes |= {p + "mlp_block.down_proj.weight": (d, f), p + "mlp_block.down_proj.bias": (d,)}
        t = p + "temporal_block."
        if kind == "recurrent":
            for name in ("linear_x", "linear_y"):
                shapes |= {t + f"{name}.weight": (lw, d), t + f"{name}.bias": (lw,)}
            shapes |= {t + "linear_out.weight": (d, lw), t + "linear_out.bias": (d,)}
            shapes |= {t + "conv_1d.weight": (lw, 1, k), t + "conv_1d.bias": (lw,)}
            shapes[t + "rg_lru.recurrent_param"] = (lw,)
            for gate in ("input_gate", "recurrent_gate"):
                shapes[t + f"rg_lru.{gate}_weight"] = (n, lw // n, lw // n)
                shapes[t + f"rg_lru.{gate}_bias"] = (n, lw // n)
        else:
            shapes |= {t + "q_proj.weight": (n * h, d), t + "k_proj.weight": (h, d)}
            shapes |= {t + "v_proj.weight": (h, d), t + "o_proj.weight": (d, n * h)}
            shapes[t + "o_proj.bias"] = (d,)
    return shapes


def _check(config: RecurrentGemmaConfig, tensors: dict[str, np.ndarray]) -> None:
    expected = expected_hf_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"unexpected tensors: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )


def _from_linear(tensors: dict[str, np.ndarray], name: str, bias: bool = True) -> Params:
    """A torch Linear ([out, in] weight) as a Dense tree ([in, out] kernel)."""
    out = {"kernel": tensors[name + ".weight"].T}
    if bias:
        out["bias"] = tensors[name + ".bias"]
    return out


def _to_linear(out: dict[str, np.ndarray], prefix: str, name: str, tree: Params) -> None:
    """Write a Dense tree as a torch Linear's tensors."""
    out[prefix + name + ".weight"] = tree["kernel"].T
    if "bias" in tree:
        out[prefix + name + ".bias"] = tree["bias"]


def params_from_hf_tensors(config: RecurrentGemmaConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Map HF tensors into our parameter tree, checking names and shapes strictly."""
    tensors = dict(tensors)
    if "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight (tied)")
    _check(config, tensors)
    params: Params = {
        "embedder": {"input_embedding": tensors["model.embed_tokens.weight"]},
        "final_norm": {"scale": tensors["model.final_norm.weight"]},
    }
    for i, kind in enumerate(config.block_types):
        p = f"model.layers.{i}."
        t = {name[len(p) :]: value for name, value in tensors.items() if name.startswith(p)}

        dense = functools.partial(_from_linear, t)
        m = "mlp_block."
        block: Params = {
            "temporal_pre_norm": {"scale": t["temporal_pre_norm.weight"]},
            "channel_pre_norm": {"scale": t["channel_pre_norm.weight"]},
            "mlp_block": {
                "ffw_up": {
                    "w": np.stack([t[m + "gate_proj.weight"].T, t[m + "up_proj.weight"].T]),
                    "b": np.stack([t[m + "gate_proj.bias"], t[m + "up_proj.bias"]])[:, None, None],
                },
                "ffw_down": dense(m + "down_proj"),
            },
        }
        tb = "temporal_block."
        if kind == "recurrent":
            block["recurrent_block"] = {
                "linear_x": dense(tb + "linear_x"),
                "linear_y": dense(tb + "linear_y"),
                "linear_out": dense(tb + "linear_out"),
                # torch's depthwise kernel [l, 1, k] is a cross-correlation: tap k-1 is the
                # current token, as in the official [k, l] layout, so no flip.
                "conv_1d": {"w": t[tb + "conv_1d.weight"][:, 0, :].T, "b": t[tb + "conv_1d.bias"]},
                "rg_lru": {
                    "a_param": t[tb + "rg_lru.recurrent_param"],
                    "input_gate": {
                        "w": t[tb + "rg_lru.input_gate_weight"],
                        "b": t[tb + "rg_lru.input_gate_bias"],
                    },
                    "a_gate": {
                        "w": t[tb + "rg_lru.recurrent_gate_weight"],
                        "b": t[tb + "rg_lru.recurrent_gate_bias"],
                    },
                },
            }
        else:
            block["attention_block"] = {
                "proj_q": dense(tb + "q_proj", bias=False),
                "proj_k": dense(tb + "k_proj", bias=False),
                "proj_v": dense(tb + "v_proj", bias=False),
                "proj_final": dense(tb + "o_proj"),
            }
        params[f"blocks.{i}"] = block
    dtype = _NP_DTYPES[config.param_dtype]
    return jax.tree.map(lambda a: np.ascontiguousarray(a, dtype=dtype), params)


def params_to_hf_tensors(
    config: RecurrentGemmaConfig, params: Params, dtype: str
) -> dict[str, np.ndarray]:
    """Map our parameter tree to HF tensor names (the inverse of params_from_hf_tensors)."""
    params = jax.tree.map(np.asarray, params)
    out = {
        "model.embed_tokens.weight": params["embedder"]["input_embedding"],
        "model.final_norm.weight": params["final_norm"]["scale"],
    }
    for i, kind in enumerate(config.block_types):
        block, p = params[f"blocks.{i}"], f"model.layers.{i}."

        dense = functools.partial(_to_linear, out, p)
        out[p + "temporal_pre_norm.weight"] = block["temporal_pre_norm"]["scale"]
        out[p + "channel_pre_norm.weight"] = block["channel_pre_norm"]["scale"]
        up = block["mlp_block"]["ffw_up"]
        for j, name in enumerate(("gate_proj", "up_proj")):
            out[p + f"mlp_block.{name}.weight"] = up["w"][j].T
            out[p + f"mlp_block.{name}.bias"] = up["b"][j, 0, 0]
        dense("mlp_block.down_proj", block["mlp_block"]["ffw_down"])
        tb = "temporal_block."
        if kind == "recurrent":
            rec = block["recurrent_block"]
            for name in ("linear_x", "linear_y", "linear_out"):
                dense(tb + name, rec[name])
            out[p + tb + "conv_1d.weight"] = rec["conv_1d"]["w"].T[:, None, :]
            out[p + tb + "conv_1d.bias"] = rec["conv_1d"]["b"]
            lru = rec["rg_lru"]
            out[p + tb + "rg_lru.recurrent_param"] = lru["a_param"]
            for ours, theirs in (("input_gate", "input_gate"), ("a_gate", "recurrent_gate")):
                out[p + tb + f"rg_lru.{theirs}_weight"] = lru[ours]["w"]
                out[p + tb + f"rg_lru.{theirs}_bias"] = lru[ours]["b"]
        else:
            att = block["attention_block"]
            for ours, theirs in (("proj_q", "q_proj"), ("proj_k", "k_proj"), ("proj_v", "v_proj")):
                dense(tb + theirs, att[ours])
            dense(tb + "o_proj", att["proj_final"])
    np_dtype = _NP_DTYPES[dtype]
    return {name: np.ascontiguousarray(a, dtype=np_dtype) for name, a in out.items()}


def load_hf(
    directory: str | Path,
    window_semantics: WindowSemantics | None = None,
    dtype: str | None = None,
) -> tuple[RecurrentGemmaConfig, Params]:
    """Load a Hugging Face RecurrentGemma directory into (config, params) (`window_semantics`
    as `config_from_hf` picks it)."""
    config = config_from_hf(read_hf_config(directory), window_semantics, dtype)
    return config, params_from_hf_tensors(config, dict(read_safetensors(directory)))


def save_hf(
    config: RecurrentGemmaConfig, params: Params, directory: str | Path, dtype: str | None = None
) -> Path:
    """Write `config.json` and `model.safetensors` that transformers loads."""
    dtype = dtype or config.param_dtype
    tensors = params_to_hf_tensors(config, params, dtype)
    return write_hf_directory(directory, tensors, config_to_hf(config, dtype))
