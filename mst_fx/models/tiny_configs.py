"""Any Hugging Face causal-LM family as a tiny model with random weights, for coverage and tests.

    model = tiny_model("mistral")          # MistralForCausalLM, 2 layers, hidden 64, vocab 512
    reason = why_not_built("gemma3")       # "multimodal: ..." (or None when it can be built)

The family's own config class supplies every default; only the size fields are made small and the
randomness is turned off (dropout, router jitter), so that a compiled training step can be compared
with an eager one. Nothing is downloaded.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Canonical names; a family spelling one differently (n_embd, d_model, ...) has it in its config's
# `attribute_map` or in `_SYNONYMS`. Only the fields a family's config has are set.
TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rotary_dim": 8,  # partial rotary (GPT-J, CodeGen): must fit in head_dim
    # mixture-of-experts: few small experts, so that a family builds fast
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 128,
    "first_k_dense_replace": 1,  # DeepSeek-style: one dense layer, then mixture-of-experts layers
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention (DeepSeek-V2/V3 and kin)
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,  # the rotary embedding is built for head_dim, which MLA families set to this
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
}

# Other spellings of the canonical sizes that no `attribute_map` declares.
_SYNONYMS = {
    "intermediate_size": ("n_inner", "ffn_dim", "decoder_ffn_dim", "ffn_hidden_size", "feed_forward_size"),
    # ProphetNet's num_hidden_layers is its encoder's, unused by the causal LM but still counted
    "num_hidden_layers": ("decoder_layers", "num_decoder_layers", "num_encoder_layers", "num_layers"),
    "num_attention_heads": ("decoder_attention_heads",),
    "hidden_size": ("d_model",),
}

# Fields that make a training step random; zero them so that eager and compiled agree.
_RANDOM_FIELD_WORDS = ("dropout", "pdrop", "layerdrop", "jitter")

# Per-family overrides on top of TINY_SIZES (a sub-config's as a nested dict), each with why.
FAMILY_OVERRIDES: dict[str, dict] = {
    # the global transformer's width is repeated in the byte encoder and decoder configs
    "blt": {
        "encoder_config": {"hidden_size_global": 64},
        "decoder_config": {"hidden_size_global": 64},
        "encoder_hash_byte_group_vocab": 512,
    },
    # defaults have no RoPE parameters, but the model looks them up per layer type
    "cohere_compass_text": {
        "rope_parameters": {
            t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("full_attention", "sliding_attention")
        }
    },
    # transformers 5.24's DbrxAttention reads attn_config.rope_theta, which the config no longer
    # defines, and clamps by clip_qkv even when it is None (the real DBRX uses 8)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # the default n_shared_experts is None, but the model multiplies by it
    "dots1": {"n_shared_experts": 1},
    # the default shares the KV cache of 15 layers; 0.95 sparsity in the first layer as in the real model
    # and the per-layer-input embeddings (262144 x 256 per layer) made small
    "gemma3n_text": {
        "num_kv_shared_layers": 0,
        "activation_sparsity_pattern": [0.95, 0.0],
        "vocab_size_per_layer_input": 512,
        "hidden_size_per_layer_input": 16,
    },
    # one (global, local) attention pair instead of the default's 12
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # expert width and the count of "zero" (identity) experts have their own fields
    "longcat_flash": {"expert_ffn_hidden_size": 32, "zero_expert_num": 2},
    # the default layer_types is None, but the model indexes it: one conv and one attention layer
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # SSM heads must tile hidden_size * expand (128)
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    # the LM-head class asserts is_decoder; local attention only (LSH hashing draws random rotations)
    "reformer": {"is_decoder": True, "attn_layers": ["local", "local"], "axial_pos_embds": False},
    # without a language the forward raises; the adapters are per language
    "xmod": {"default_language": "en_XX"},
    # hybrid stacks: a fixed per-layer list of the default depth; one Mamba and one hybrid layer
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},  # its weight tying needs two hybrid layers
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"], "hybrid_layer_ids": [1]},
    # ZAYA supports one expert per token only
    "zaya": {"num_experts_per_tok": 1},
}

# Families left out, with why. Multimodal families are also found by their sub-configs.
NOT_BUILT: dict[str, str] = {
    "fuyu": "multimodal: image patches through a linear projection (no vision_config); text goes through Persimmon",
    "gemma4_assistant": "speculative-decoding draft model: reads the target model's KV states, returns no loss",
    "gemma4_unified_assistant": "speculative-decoding draft model: reads the target model's KV states, returns no loss",
    "musicgen": "audio: a decoder over audio codebooks (batch x codebooks token ids)",
    "musicgen_melody": "audio: a decoder over audio codebooks (batch x codebooks token ids)",
}

_MULTIMODAL_SUB_CONFIGS = ("vision_config", "audio_config", "vq_config", "audio_encoder_config", "audio_encoder")


def causal_lm_families() -> list[str]:
    """Every model type Hugging Face maps to a causal-LM class, in the mapping's order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def why_not_built(model_type: str) -> str | None:
    """Why `tiny_model(model_type)` is not attempted (cheap: looks at the config classes only)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in NOT_BUILT:
        return NOT_BUILT[model_type]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "not a causal-LM family of this transformers version"
    config_class = _config_class(model_type)
    media = [k for k in getattr(config_class, "sub_configs", {}) if k in _MULTIMODAL_SUB_CONFIGS]
    if media:
        return f"multimodal ({', '.join(media)} in {config_class.__name__})"
    return None


def _model_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _config_class(model_type: str):
    """The family's own config class; for a multimodal family whose causal-LM class is its text
    model (Qwen3.5, Mllama), that model's text config."""
    from transformers import CONFIG_MAPPING

    family_config, model_config = CONFIG_MAPPING[model_type], _model_class(model_type).config_class
    if model_config is not family_config and "text_config" in getattr(family_config, "sub_configs", {}):
        return model_config
    return family_config


def tiny_config(model_type: str):
    """The family's config with tiny sizes, no randomness and no KV cache (training needs none)."""
    return _tiny(_config_class(model_type), FAMILY_OVERRIDES.get(model_type, {}))


def _tiny(config_class, overrides: dict):
    defaults = config_class().to_dict()
    values = {name: 0.0 for name, value in defaults.items() if _is_random_knob(name, value)}
    for canonical, size in TINY_SIZES.items():
        for name in (canonical, *_SYNONYMS.get(canonical, ())):
            if _field(config_class, name) in defaults:
                values[_field(config_class, name)] = size
    values |= _keep_multi_head(config_class, defaults)
    vocab = values.get(_field(config_class, "vocab_size"))
    if vocab is not None:  # special tokens past the tiny vocabulary would index out of the embedding
        values |= {name: _clip_token(value, vocab) for name, value in defaults.items() if name.endswith("token_id")}
    if "use_cache" in defaults:
        values["use_cache"] = False
    sub_configs = getattr(config_class, "sub_configs", {})
    for key, sub_class in sub_configs.items():
        values[key] = _tiny(sub_class, overrides.get(key, {})).to_dict()
    values |= {k: v for k, v in overrides.items() if k not in sub_configs}
    return config_class(**values)


def _field(config_class, canonical: str) -> str:
    """The family's name for a canonical config field (GPT-2: hidden_size -> n_embd)."""
    return config_class.attribute_map.get(canonical, canonical)


def _keep_multi_head(config_class, defaults: dict) -> dict:
    """As many KV heads as query heads where the family's defaults have that: some (DeepSeek's
    MLA) expand their keys to every head and break on grouped-query attention."""
    kv, q = _field(config_class, "num_key_value_heads"), _field(config_class, "num_attention_heads")
    if kv in defaults and q in defaults and defaults[kv] in (None, defaults[q]):
        return {kv: TINY_SIZES["num_attention_heads"]}
    return {}


def _is_random_knob(name: str, value) -> bool:
    return isinstance(value, float) and any(word in name for word in _RANDOM_FIELD_WORDS)


def _clip_token(value, vocab: int):
    if isinstance(value, list):
        return [_clip_token(v, vocab) for v in value]
    return min(value, vocab - 1) if isinstance(value, int) else value


def tiny_model(model_type: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """The family's `*ForCausalLM` with random weights (seeded), in train mode, without dropout.

    Falls back to eager attention where the family has no SDPA path."""
    reason = why_not_built(model_type)
    if reason is not None:
        raise ValueError(f"{model_type} is not built: {reason}")
    model_class = _model_class(model_type)
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    try:
        model = model_class._from_config(config, attn_implementation=attn_implementation)
    except ValueError as error:  # "does not support an attention implementation through ..."
        if attn_implementation == "eager" or "attention" not in str(error).lower():
            raise
        log.debug("%s: %s; using eager attention", model_type, error)
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation="eager")
    return model.train()


# Layers with an MLP, where that is not the config's layer count.
_MLP_LAYERS = {
    "falcon_mamba": lambda config: 0,  # Mamba blocks only: no MLP
    "mamba": lambda config: 0,
    "mamba2": lambda config: 0,
    # an H and an L stack; num_hidden_layers counts their layers times the recurrence cycles
    "hrm_text": lambda config: 2 * config.num_layers_per_stack,
    # one kind of block per layer: Mamba, attention, MLP or mixture-of-experts
    "nemotron_h": lambda config: sum(kind in ("mlp", "moe") for kind in config.layers_block_type),
}


def mlp_layer_count(model_type: str, config) -> int:
    """Layers of the model that have an MLP (dense or mixture-of-experts), counted from its config."""
    if model_type in _MLP_LAYERS:
        return _MLP_LAYERS[model_type](config)
    return layer_count(config)


def layer_count(config) -> int:
    """Decoder layers of a config, whatever the family calls them; a config made of sub-models
    (BLT's byte encoder, global transformer, byte decoder, patcher) has the sum of theirs."""
    for name in ("num_hidden_layers", "decoder_layers", "num_decoder_layers", "num_layers", "n_layer", "n_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return sum(layer_count(getattr(config, key)) for key in getattr(config, "sub_configs", {}))
