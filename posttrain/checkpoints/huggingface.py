"""Hugging Face directories: `load_hf` / `save_hf` of any backbone family, and the Gemma /
Gemma 2 format itself.

`config_from_hf`, `config_to_hf`, `load_hf` and `save_hf` dispatch on the config.json's
`model_type` (gemma, gemma2, recurrent_gemma) or the config's family, through
`posttrain.models.backbone`; RecurrentGemma's format is `posttrain.models.recurrentgemma.
huggingface`. Reads `config.json` and safetensors only (never pickles). The Gemma tensor mapping
is in `shared/design/backbone.md` §3.3; the one surprise is Gemma 1's naming, where HF's
`post_attention_layernorm` is the norm *before* the MLP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from posttrain.models.backbone import BackboneConfig, backbone_for_hf, backbone_of
from posttrain.models.config import ModelConfig

Params = dict[str, Any]

_MODEL_TYPES = {"gemma": "gemma1", "gemma2": "gemma2"}
_ARCHITECTURES = {
    "gemma1": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
}
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")  # old Gemma 1 configs said "gelu"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the expected tensors or shapes."""


def config_from_hf(hf_config: dict[str, Any], dtype: str | None = None) -> BackboneConfig:
    """Translate a transformers `config.json` dict into its family's config."""
    return _backbone_for(hf_config).config_from_hf(hf_config, dtype)


def config_to_hf(config: BackboneConfig, dtype: str) -> dict[str, Any]:
    """A transformers `config.json` dict for a config of any family."""
    return backbone_of(config).config_to_hf(config, dtype)


def _backbone_for(hf_config: dict[str, Any]):
    try:
        return backbone_for_hf(hf_config.get("model_type"))
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def gemma_config_from_hf(hf_config: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    """Translate a transformers Gemma / Gemma 2 `config.json` dict into a ModelConfig."""
    model_type = hf_config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(
            f"config.json model_type={model_type!r} is not supported; expected one of "
            f"{sorted(_MODEL_TYPES)}"
        )
    family = _MODEL_TYPES[model_type]
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    missing = [key for key in (*required, "vocab_size") if key not in hf_config]
    if missing:
        raise CheckpointError(f"config.json lacks required fields {missing}")
    activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act")
    if activation is not None and activation not in _TANH_GELUS:
        raise CheckpointError(f"config.json activation {activation!r} is not Gemma's tanh GELU")
    rope = hf_config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))
    stored_dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype is None:
        dtype = stored_dtype if stored_dtype in _NP_DTYPES else "float32"
    fields: dict[str, Any] = dict(
        family=family,
        num_layers=hf_config["num_hidden_layers"],
        embed_dim=hf_config["hidden_size"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]),
        head_dim=hf_config.get("head_dim")
        or hf_config["hidden_size"] // hf_config["num_attention_heads"],
        hidden_dim=hf_config["intermediate_size"],
        vocab_size=hf_config["vocab_size"],
        rope_base=float(rope_theta),
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        dtype=dtype,
        param_dtype=dtype,
    )
    if family == "gemma2":
        layer_types = hf_config.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention"
            for i in range(fields["num_layers"])
        ]
        fields.update(
            query_pre_attn_scalar=hf_config.get("query_pre_attn_scalar"),
            sliding_window=hf_config.get("sliding_window"),
            attention_pattern=_shortest_period(
                tuple("local" if kind == "sliding_attention" else "global" for kind in layer_types)
            ),
            attn_logit_softcap=hf_config.get("attn_logit_softcapping"),
            final_logit_softcap=hf_config.get("final_logit_softcapping"),
            use_post_norms=True,
        )
    return ModelConfig(**fields)


def _shortest_period(pattern: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest prefix whose repetition gives `pattern` (local, global, ... -> 2 items)."""
    for size in range(1, len(pattern) + 1):
        if all(kind == pattern[i % size] for i, kind in enumerate(pattern)):
            return pattern[:size]
    return pattern


def gemma_config_to_hf(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """A transformers `config.json` dict for this ModelConfig."""
    model_type, architecture = _ARCHITECTURES[config.family]
    hf: dict[str, Any] = dict(
        architectures=[architecture],
        model_type=model_type,
        num_hidden_layers=config.num_layers,
        hidden_size=config.embed_dim,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.hidden_dim,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        rope_parameters={"rope_theta": config.rope_base, "rope_type": "default"},
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attention_bias=False,
        dtype=dtype,
        torch_dtype=dtype,
    )
    if config.family == "gemma2":
        hf.update(
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            sliding_window=config.sliding_window,
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            layer_types=[
                "sliding_attention" if kind == "local" else "full_attention"
                for kind in config.layer_types
            ],
        )
    return hf


def _norm_names(config: ModelConfig) -> dict[str, str]:
    """Our norm name -> HF norm name within a layer."""
    if config.family == "gemma1":
        # HF's Gemma 1 calls the pre-MLP norm "post_attention_layernorm".
        return {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
    return {
        "pre_attention_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "pre_ffw_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config holds, with its shape."""
    d, n, k, h, f = (
        config.embed_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.hidden_dim,
    )
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for hf_name in _norm_names(config).values():
            shapes[p + hf_name + ".weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (n * h, d)
        shapes[p + "self_attn.k_proj.weight"] = (k * h, d)
        shapes[p + "self_attn.v_proj.weight"] = (k * h, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, n * h)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    return shapes


def _safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / "model.safetensors").exists():  # others (a reward head) are not the model's
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {directory} (pickled .bin is not read)")
    return files


def read_safetensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of a directory's safetensors files."""
    for path in _safetensor_files(directory):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, handle.get_tensor(name)


def params_from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Map HF tensors into our parameter tree, checking names and shapes strictly."""
    tensors = dict(tensors)
    expected = expected_hf_shapes(config)
    if "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
            raise CheckpointError(
                "lm_head.weight differs from model.embed_tokens.weight (Gemma ties them)"
            )
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

    dtype = _NP_DTYPES[config.param_dtype]
    d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim

    def heads(w: np.ndarray, count: int) -> np.ndarray:
        # Row n*h + j of a torch Linear is head n, dim j: [count*h, d] -> [count, d, h].
        return w.reshape(count, h, d).transpose(0, 2, 1)

    embedding = tensors["model.embed_tokens.weight"]
    if config.embed_padding:
        pad = np.zeros((config.embed_padding, d), embedding.dtype)
        embedding = np.concatenate([embedding, pad])
    params: Params = {
        "embedder": {"input_embedding": embedding},
        "final_norm": {"scale": tensors["model.norm.weight"]},
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        t = {name[len(p) :]: value for name, value in tensors.items() if name.startswith(p)}
        q = heads(t["self_attn.q_proj.weight"], n)
        key = heads(t["self_attn.k_proj.weight"], k)
        value = heads(t["self_attn.v_proj.weight"], k)
        attn = {"attn_vec_einsum": {"w": t["self_attn.o_proj.weight"].T.reshape(n, h, d)}}
        if k == n:
            attn["qkv_einsum"] = {"w": np.stack([q, key, value])}
        else:
            attn["q_einsum"] = {"w": q}
            attn["kv_einsum"] = {"w": np.stack([key, value])}
        layer: Params = {
            "attn": attn,
            "mlp": {
                "gating_einsum": np.stack([t["mlp.gate_proj.weight"].T, t["mlp.up_proj.weight"].T]),
                "linear": t["mlp.down_proj.weight"].T,
            },
        }
        for ours, theirs in _norm_names(config).items():
            layer[ours] = {"scale": t[theirs + ".weight"]}
        params[f"layer_{i}"] = layer
    return jax.tree.map(lambda a: np.ascontiguousarray(a, dtype=dtype), params)


def params_to_hf_tensors(config: ModelConfig, params: Params, dtype: str) -> dict[str, np.ndarray]:
    """Map our parameter tree to HF tensor names (the inverse of params_from_hf_tensors)."""
    np_dtype = _NP_DTYPES[dtype]
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    params = jax.tree.map(np.asarray, params)

    def rows(w: np.ndarray) -> np.ndarray:
        # [count, d, h] -> [count*h, d]
        return w.transpose(0, 2, 1).reshape(-1, d)

    out = {
        "model.embed_tokens.weight": params["embedder"]["input_embedding"][: config.vocab_size],
        "model.norm.weight": params["final_norm"]["scale"],
    }
    for i in range(config.num_layers):
        layer, p = params[f"layer_{i}"], f"model.layers.{i}."
        attn = layer["attn"]
        if k == n:
            q, key, value = attn["qkv_einsum"]["w"]
        else:
            q = attn["q_einsum"]["w"]
            key, value = attn["kv_einsum"]["w"]
        out[p + "self_attn.q_proj.weight"] = rows(q)
        out[p + "self_attn.k_proj.weight"] = rows(key)
        out[p + "self_attn.v_proj.weight"] = rows(value)
        out[p + "self_attn.o_proj.weight"] = attn["attn_vec_einsum"]["w"].reshape(n * h, d).T
        gating = layer["mlp"]["gating_einsum"]
        out[p + "mlp.gate_proj.weight"] = gating[0].T
        out[p + "mlp.up_proj.weight"] = gating[1].T
        out[p + "mlp.down_proj.weight"] = layer["mlp"]["linear"].T
        for ours, theirs in _norm_names(config).items():
            out[p + theirs + ".weight"] = layer[ours]["scale"]
    return {name: np.ascontiguousarray(a, dtype=np_dtype) for name, a in out.items()}


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """A Hugging Face directory's config.json, or a CheckpointError naming the missing file."""
    config_path = Path(directory) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{config_path} not found")
    return json.loads(config_path.read_text())


def write_hf_directory(
    directory: str | Path, tensors: dict[str, np.ndarray], config: dict[str, Any]
) -> Path:
    """Write `model.safetensors` and `config.json` through temporary names and renames, so a
    crash never leaves a half-written checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config = directory / "config.json.tmp"
    tmp_config.write_text(json.dumps(config, indent=2))
    tmp_weights.replace(directory / "model.safetensors")
    tmp_config.replace(directory / "config.json")
    return directory


def load_hf(directory: str | Path, dtype: str | None = None) -> tuple[BackboneConfig, Params]:
    """Load a Hugging Face directory of any family (its config.json's `model_type` says which)
    into (config, params)."""
    directory = Path(directory)
    return _backbone_for(read_hf_config(directory)).load_hf(directory, dtype)


def save_hf(
    config: BackboneConfig, params: Params, directory: str | Path, dtype: str | None = None
) -> Path:
    """Write `config.json` and `model.safetensors` that transformers loads (any family)."""
    return backbone_of(config).save_hf(config, params, Path(directory), dtype)


def load_gemma_hf(directory: str | Path, dtype: str | None = None) -> tuple[ModelConfig, Params]:
    """Load a Hugging Face Gemma / Gemma 2 directory into (config, params)."""
    directory = Path(directory)
    config = gemma_config_from_hf(read_hf_config(directory), dtype)
    params = params_from_hf_tensors(config, dict(read_safetensors(directory)))
    return config, params


def save_gemma_hf(
    config: ModelConfig, params: Params, directory: str | Path, dtype: str | None = None
) -> Path:
    """Write a Gemma / Gemma 2 `config.json` and `model.safetensors` that transformers loads."""
    dtype = dtype or config.param_dtype
    tensors = params_to_hf_tensors(config, params, dtype)
    return write_hf_directory(directory, tensors, gemma_config_to_hf(config, dtype))
