#!/usr/bin/env python3
"""Build the logit-parity fixtures under tests/fixtures/parity/.

For each architecture (llama, qwen2, qwen3, gemma3, mistral, phi3) this script builds a tiny
model with HF transformers, re-randomizes EVERY parameter with a fixed seed (so
norm weights, biases and q/k norms all matter), saves it with
`save_pretrained` (safetensors; the llama one sharded), and writes golden
logits for a prefill of N >= 300 tokens plus 8 greedy decode steps taken one
token at a time through the KV cache (DynamicCache).  The goldens are checked
against a single non-cached forward over the whole sequence before writing.

For phi3 it also writes golden_short.safetensors, the same goldens for a prompt short
enough (40 + 8 tokens < original_max_position_embeddings 64) that longrope uses its SHORT
factors; for mistral and phi3 it asserts that HF's own prefill in 77-token chunks matches the
one-forward goldens.

It also writes:
  * gemma3_multimodal_config/config.json: a Gemma3ForConditionalGeneration
    config (text_config nested, vision_config present), no weights;
  * legacy_configs/<name>.json: the same text configs in the pre-5.x spelling
    (`rope_theta` / `rope_scaling` / `rope_local_base_freq` /
    `sliding_window_pattern`), verified to load in transformers to the same
    rope parameters as the new spelling.

Usage (CPU, float32, deterministic):
    python scripts/make_parity_fixtures.py [--out tests/fixtures/parity] [--only NAME ...]

`--only mistral phi3` rebuilds just those fixture directories (and their legacy configs),
leaving every other committed file byte-identical.

The convention of the golden files is documented in
tests/fixtures/parity/README.md (kept by hand next to the fixtures; update it
when this script changes what it writes).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    DynamicCache,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

PROMPT_LEN = 320
DECODE_STEPS = 8
SELF_CONSISTENCY_TOL = 1e-4
# Greedy tokens must not hinge on a near-tie, or an implementation that is
# correct to 1e-3 could still pick another token.
MIN_TOP2_MARGIN = 0.05
MAX_FIXTURE_BYTES = 2 * 1024 * 1024
# Random models often fall into a repeated token under greedy decoding; insist
# on a varied chain so the decode steps test something.
MIN_DISTINCT_DECODE_IDS = 4
# Seeds tried (spec seed, spec seed + 1, ...) until the goldens are not degenerate.
MAX_SEED_ATTEMPTS = 64


# --------------------------------------------------------------------------
# Model specifications
# --------------------------------------------------------------------------


def llama_spec():
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    legacy = {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }
    return dict(
        name="llama",
        model_cls=LlamaForCausalLM,
        config=config,
        legacy_rope=legacy,
        norm_style="one_centered",
        embed_std=0.3,
        final_norm_gain=1.0,
        seed=1001,
        max_shard_size="160KB",
        sensitivity=[
            ("llama3 rope scaling -> plain rope", "config", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
            ("RMSNorm weights -> 1", "params", ("norm.weight", 1.0)),
        ],
        features=[
            "LlamaForCausalLM",
            "llama3 rope scaling (factor 8, low 1, high 4, original_max_position_embeddings 64): "
            "with rope_theta 5e5 and head_dim 16 the 8 frequencies fall in all three llama3 bands "
            "(unchanged high-frequency, smoothly interpolated, divided by factor)",
            "GQA: 4 query heads, 2 kv heads (group 2), explicit head_dim 16",
            "untied embeddings (separate lm_head.weight)",
            "sharded safetensors with model.safetensors.index.json",
            "all RMSNorm weights random around 1 (y = w * x / rms(x))",
        ],
    )


def qwen2_spec():
    config = Qwen2Config(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    legacy = {"rope_theta": 1000000.0, "rope_scaling": None}
    return dict(
        name="qwen2",
        model_cls=Qwen2ForCausalLM,
        config=config,
        legacy_rope=legacy,
        norm_style="one_centered",
        embed_std=0.1,
        final_norm_gain=3.0,
        seed=2002,
        max_shard_size=None,
        sensitivity=[
            ("q/k/v biases -> 0", "params", ("_proj.bias", 0.0)),
            ("rope_theta 1e6 -> 1e4", "config", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ],
        features=[
            "Qwen2ForCausalLM",
            "q/k/v projections WITH bias (random nonzero), o_proj without bias",
            "GQA: 6 query heads, 2 kv heads (group 3), head_dim = hidden/heads = 16 (no head_dim key needed)",
            "rope_theta 1e6 (non-default), default rope type",
            "TIED embeddings: no lm_head.weight in the safetensors; logits use embed_tokens.weight",
            "all RMSNorm weights random around 1",
        ],
    )


def qwen3_spec():
    config = Qwen3Config(
        vocab_size=288,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )
    legacy = {
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    }
    return dict(
        name="qwen3",
        model_cls=Qwen3ForCausalLM,
        config=config,
        legacy_rope=legacy,
        norm_style="one_centered",
        embed_std=0.3,
        final_norm_gain=1.0,
        seed=3003,
        max_shard_size=None,
        sensitivity=[
            ("yarn -> plain rope", "config", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
            ("q_norm/k_norm weights -> 1", "params", ("_norm.weight", 1.0)),
        ],
        features=[
            "Qwen3ForCausalLM",
            "q_norm / k_norm (per-head RMSNorm over head_dim, applied before rope), random weights around 1",
            "yarn rope scaling: factor 4, original_max_position_embeddings 128, beta_fast/beta_slow defaults "
            "32/1, truncate default true, attention_factor default 0.1*ln(4)+1 applied to cos and sin",
            "explicit head_dim 32 != hidden/heads (64/4 = 16): q_proj is [128, 64], o_proj is [64, 128]",
            "GQA: 4 query heads, 2 kv heads (group 2)",
            "untied embeddings",
        ],
    )


def gemma3_spec():
    config = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        query_pre_attn_scalar=24,
        sliding_window=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    legacy = {
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 3,
        "drop_layer_types": True,
    }
    return dict(
        name="gemma3",
        model_cls=Gemma3ForCausalLM,
        config=config,
        legacy_rope=legacy,
        norm_style="zero_centered",
        embed_std=0.05,
        final_norm_gain=4.0,
        seed=4004,
        max_shard_size=None,
        sensitivity=[
            ("sliding_window 32 -> 4096 (no window)", "config", {"sliding_window": 4096}),
            ("query_pre_attn_scalar 24 -> head_dim 32", "config", {"query_pre_attn_scalar": 32}),
            (
                "global linear rope factor 8 -> no scaling",
                "config",
                {
                    "rope_parameters": {
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                    }
                },
            ),
            (
                "local rope theta 1e4 -> 1e6",
                "config",
                {
                    "rope_parameters": {
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                    }
                },
            ),
            ("(1+w) norm weights w -> 0", "params", ("norm.weight", 0.0)),
        ],
        features=[
            "Gemma3ForCausalLM (model_type gemma3_text)",
            "sliding_window 32 < prompt length: a sliding layer at query position q attends to key "
            "positions k with q - 32 < k <= q (32 keys including itself)",
            "layer_types [sliding, sliding, full, sliding] (== legacy sliding_window_pattern 3)",
            "local rope theta 1e4 (default type) on sliding layers; global rope theta 1e6 with LINEAR "
            "scaling factor 8 on full layers",
            "query_pre_attn_scalar 24 != head_dim 32: scores scaled by 24**-0.5",
            "(1 + w) RMSNorm everywhere (input/post_attention/pre_feedforward/post_feedforward layernorms, "
            "q_norm, k_norm, final norm), w random around 0",
            "embeddings multiplied by sqrt(hidden_size) = 8.0 (computed in the weight dtype)",
            "tied embeddings, GQA 4 query heads / 2 kv heads, gelu_pytorch_tanh MLP",
        ],
    )


def mistral_spec():
    config = MistralConfig(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        sliding_window=48,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    legacy = {"rope_theta": 10000.0, "rope_scaling": None}
    return dict(
        name="mistral",
        model_cls=MistralForCausalLM,
        config=config,
        legacy_rope=legacy,
        norm_style="one_centered",
        embed_std=0.3,
        final_norm_gain=1.0,
        seed=5005,
        max_shard_size=None,
        hf_chunked_prefill_check=True,
        sensitivity=[
            ("sliding_window 48 -> null (no window)", "config", {"sliding_window": None}),
            ("RMSNorm weights -> 1", "params", ("norm.weight", 1.0)),
        ],
        features=[
            "MistralForCausalLM",
            "sliding_window 48 < prompt length 320 on EVERY layer (Mistral has no layer_types): query "
            "position q attends to key positions k with q - 48 < k <= q (48 keys including itself)",
            "GQA: 4 query heads, 1 kv head (group 4), explicit head_dim 24 != hidden/heads (64/4 = 16)",
            "default rope, rope_theta 1e4",
            "untied embeddings (separate lm_head.weight)",
            "all RMSNorm weights random around 1",
        ],
    )


# Phi-3 longrope: per-frequency rescale lists (length rotary_dim / 2 = 12), all values distinct.
PHI3_SHORT_FACTOR = [round(1.0 + 0.05 * i + 0.002 * i * i, 4) for i in range(12)]
PHI3_LONG_FACTOR = [round(1.3**i + 0.1 * i, 4) for i in range(12)]
# original_max_position_embeddings must stay below 77 (the chunk size of the chunked parity
# check): then every forward of the 320-token prompt, chunked or not, uses the LONG factors.
# The short golden (40 + 8 tokens, largest position 47) stays at seq_len <= 64: SHORT factors.
PHI3_ORIGINAL_MAX_POS = 64
PHI3_SHORT_PROMPT_LEN = 40


def phi3_spec():
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": list(PHI3_SHORT_FACTOR),
        "long_factor": list(PHI3_LONG_FACTOR),
    }
    config = Phi3Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=1024,
        original_max_position_embeddings=PHI3_ORIGINAL_MAX_POS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rope_parameters=copy.deepcopy(rope),
    )
    legacy = {
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": list(PHI3_SHORT_FACTOR),
            "long_factor": list(PHI3_LONG_FACTOR),
        },
    }

    def with_rope(**changes):
        r = copy.deepcopy(rope)
        r["original_max_position_embeddings"] = PHI3_ORIGINAL_MAX_POS
        r.update(changes)
        return {"rope_parameters": r}

    return dict(
        name="phi3",
        model_cls=Phi3ForCausalLM,
        config=config,
        legacy_rope=legacy,
        norm_style="one_centered",
        embed_std=0.3,
        final_norm_gain=1.0,
        seed=6006,
        max_shard_size=None,
        hf_chunked_prefill_check=True,
        sensitivity=[
            ("longrope long_factor -> short_factor", "config", with_rope(long_factor=list(PHI3_SHORT_FACTOR))),
            ("longrope attention_factor -> 1", "config", with_rope(attention_factor=1.0)),
            (
                "partial_rotary_factor 0.75 -> 0.5 (first 8 factors)",
                "config",
                with_rope(
                    partial_rotary_factor=0.5,
                    short_factor=PHI3_SHORT_FACTOR[:8],
                    long_factor=PHI3_LONG_FACTOR[:8],
                ),
            ),
        ],
        short_golden=dict(
            prompt_len=PHI3_SHORT_PROMPT_LEN,
            decode_steps=DECODE_STEPS,
            sensitivity=[
                ("longrope short_factor -> long_factor", "config", with_rope(short_factor=list(PHI3_LONG_FACTOR))),
            ],
        ),
        features=[
            "Phi3ForCausalLM",
            "fused self_attn.qkv_proj.weight [q rows | k rows | v rows] = [128 + 64 + 64, 128] and "
            "mlp.gate_up_proj.weight [gate rows | up rows] = [2 * 96, 128]",
            "longrope: rope_theta 1e4, short_factor / long_factor lists of 12 distinct values, "
            f"original_max_position_embeddings {PHI3_ORIGINAL_MAX_POS} (top level of config.json, copied into "
            "rope_parameters), max_position_embeddings 1024, so factor 16 and attention_factor "
            f"sqrt(1 + ln 16 / ln {PHI3_ORIGINAL_MAX_POS}) applied to cos and sin",
            "longrope factor choice per forward: seq_len = max(position_ids) + 1; LONG factors when "
            f"seq_len > {PHI3_ORIGINAL_MAX_POS} (the whole 320-token golden, and every 77-token chunk of it), "
            f"SHORT factors otherwise (golden_short.safetensors: {PHI3_SHORT_PROMPT_LEN} + 8 tokens)",
            "partial_rotary_factor 0.75: only the first 24 of the 32 head dims are rotated",
            "GQA: 4 query heads, 2 kv heads (group 2), head_dim = hidden/heads = 32 (no head_dim key)",
            "untied embeddings, all RMSNorm weights random around 1",
        ],
    )


SPECS = [llama_spec, qwen2_spec, qwen3_spec, gemma3_spec, mistral_spec, phi3_spec]


# --------------------------------------------------------------------------
# Re-randomization
# --------------------------------------------------------------------------


def is_norm_weight(name: str) -> bool:
    leaf = name.split(".")[-2] if name.endswith(".weight") else ""
    return leaf.endswith("norm") or leaf.endswith("layernorm")


@torch.no_grad()
def rerandomize(model: torch.nn.Module, norm_style: str, seed: int, embed_std: float, final_norm_gain: float) -> dict:
    """Overwrite every parameter with seeded random values that make each one matter.

    Norm weights get an effective gain of about 1 +- 0.1 (stored as 1 + 0.1 n, or
    as 0.1 n for Gemma's (1 + w) form); the final norm gets an effective gain of
    `final_norm_gain` (+- 0.1) so that tied models, whose small embeddings keep
    the layers dominant in the residual stream, still produce logits with a
    useful spread.
    """
    gen = torch.Generator().manual_seed(seed)
    offset = 0.0 if norm_style == "one_centered" else -1.0
    summary = {}
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = tuple(param.shape)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if is_norm_weight(name):
            gain = final_norm_gain if name == "model.norm.weight" else 1.0
            base = gain + offset
            value = base + 0.1 * noise
            kind = f"norm weight {base:+.1f} +- 0.1 (effective gain {gain:.1f})"
        elif name.endswith(".bias"):
            value = 0.1 * noise
            kind = "bias 0.1"
        elif "embed_tokens" in name or name.startswith("lm_head"):
            value = embed_std * noise
            kind = f"embedding {embed_std}"
        elif param.dim() == 2:
            fan_in = shape[1]
            value = noise / fan_in**0.5
            kind = "linear 1/sqrt(fan_in)"
        else:
            raise RuntimeError(f"unhandled parameter {name} {shape}")
        param.copy_(value)
        summary[name] = kind
    return summary


# --------------------------------------------------------------------------
# Goldens
# --------------------------------------------------------------------------


@torch.no_grad()
def make_goldens(model, config, seed: int, prompt_len: int = PROMPT_LEN, decode_steps: int = DECODE_STEPS, ids_seed=None):
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(seed + 7 if ids_seed is None else ids_seed)
    input_ids = torch.randint(0, vocab, (prompt_len,), generator=gen, dtype=torch.int64)

    # transformers 5.24 renamed the forward argument `past_key_values` to `cache`.
    forward_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in forward_params else "past_key_values"
    cache = DynamicCache(config=config)
    out = model(input_ids=input_ids[None], use_cache=True, **{cache_kw: cache})
    prefill_logits = out.logits[0].float().clone()
    # The DynamicCache is updated in place.

    decode_ids = []
    decode_logits = []
    next_id = int(prefill_logits[-1].argmax())
    for step in range(decode_steps):
        decode_ids.append(next_id)
        pos = prompt_len + step
        step_kwargs = {cache_kw: cache, "position_ids": torch.tensor([[pos]], dtype=torch.int64)}
        if "cache_position" in forward_params:
            step_kwargs["cache_position"] = torch.tensor([pos], dtype=torch.int64)
        out = model(input_ids=torch.tensor([[next_id]], dtype=torch.int64), use_cache=True, **step_kwargs)
        step_logits = out.logits[0, -1].float().clone()
        decode_logits.append(step_logits)
        next_id = int(step_logits.argmax())
    # The last decode step must have run against a cache holding everything before it.
    cached = cache.get_seq_length()
    assert cached == prompt_len + decode_steps, f"cache holds {cached} positions, not {prompt_len + decode_steps}"
    decode_ids_t = torch.tensor(decode_ids, dtype=torch.int64)
    decode_logits_t = torch.stack(decode_logits)

    # Self-consistency: one non-cached forward over prompt + decoded tokens.
    full_ids = torch.cat([input_ids, decode_ids_t])
    full = model(input_ids=full_ids[None], use_cache=False).logits[0].float()
    diff_prefill = (full[:prompt_len] - prefill_logits).abs().max().item()
    diff_decode = (full[prompt_len:] - decode_logits_t).abs().max().item()
    assert diff_prefill < SELF_CONSISTENCY_TOL, f"prefill vs full forward differ by {diff_prefill}"
    assert diff_decode < SELF_CONSISTENCY_TOL, f"incremental decode vs full forward differ by {diff_decode}"

    # Greedy chain check: decode_ids[i+1] == argmax(decode_logits[i]).
    assert int(prefill_logits[-1].argmax()) == decode_ids[0]
    for i in range(decode_steps - 1):
        assert int(decode_logits_t[i].argmax()) == decode_ids[i + 1]

    # Margins that decide greedy tokens (the 8 stored ids).
    deciding = torch.cat([prefill_logits[-1:], decode_logits_t[:-1]])
    top2 = deciding.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()

    stats = {
        "prefill_logits_std": prefill_logits.std().item(),
        "prefill_logits_absmax": prefill_logits.abs().max().item(),
        "decode_logits_std": decode_logits_t.std().item(),
        "distinct_prefill_argmax": int(prefill_logits.argmax(-1).unique().numel()),
        "distinct_decode_ids": int(decode_ids_t.unique().numel()),
        "min_greedy_top2_margin": min(margins),
        "max_abs_diff_prefill_vs_full_forward": diff_prefill,
        "max_abs_diff_decode_vs_full_forward": diff_decode,
    }
    tensors = {
        "input_ids": input_ids.contiguous(),
        "prefill_logits": prefill_logits.contiguous(),
        "decode_ids": decode_ids_t.contiguous(),
        "decode_logits": decode_logits_t.contiguous(),
    }
    return tensors, stats


# A feature counts as exercised when switching it off moves some prefill logit by more than this.
MIN_FEATURE_EFFECT = 0.05


@torch.no_grad()
def feature_effects(spec, model, config, input_ids, prefill_logits, sensitivity=None) -> dict:
    """Max |logit change| when each listed feature is switched off; each must be large."""
    effects = {}
    for label, kind, change in spec["sensitivity"] if sensitivity is None else sensitivity:
        cfg = copy.deepcopy(config)
        if kind == "config":
            for key, value in change.items():
                setattr(cfg, key, copy.deepcopy(value))
        variant = spec["model_cls"](cfg).to(torch.float32).eval()
        variant.load_state_dict(model.state_dict())
        if kind == "params":
            suffix, value = change
            for name, param in variant.named_parameters():
                if name.endswith(suffix):
                    param.fill_(value)
        logits = variant(input_ids=input_ids[None], use_cache=False).logits[0]
        effect = (logits - prefill_logits).abs().max().item()
        if effect < MIN_FEATURE_EFFECT:
            raise RuntimeError(f"{spec['name']}: '{label}' changes logits by only {effect:.2e}; not exercised")
        effects[label] = effect
    return effects


# Chunk size of the chunked-prefill parity check (tests/tests/parity.rs).
PARITY_CHUNK = 77


@torch.no_grad()
def chunked_prefill_diff(model, config, input_ids, prefill_logits, chunk: int = PARITY_CHUNK) -> float:
    """Max |logit diff| between HF's own prefill in `chunk`-token pieces through a DynamicCache
    and the one-forward golden: a chunked implementation can only agree with the goldens if HF
    itself does (for longrope: only if every chunk picks the same factor set as the whole prompt)."""
    forward_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in forward_params else "past_key_values"
    cache = DynamicCache(config=config)
    pieces = []
    for start in range(0, input_ids.numel(), chunk):
        ids = input_ids[start : start + chunk]
        kwargs = {cache_kw: cache, "position_ids": torch.arange(start, start + ids.numel())[None]}
        if "cache_position" in forward_params:
            kwargs["cache_position"] = torch.arange(start, start + ids.numel())
        pieces.append(model(input_ids=ids[None], use_cache=True, **kwargs).logits[0].float())
    return (torch.cat(pieces) - prefill_logits).abs().max().item()


def degeneracy_problem(stats: dict) -> str | None:
    """Why these goldens would make a weak test, or None when they are fine."""
    std = stats["prefill_logits_std"]
    if not (0.5 <= std <= 8.0):
        return f"prefill logits std {std:.3f} outside [0.5, 8]; adjust init scales"
    if stats["distinct_prefill_argmax"] < 10:
        return "prefill argmax nearly constant; adjust init scales"
    if stats["distinct_decode_ids"] < MIN_DISTINCT_DECODE_IDS:
        return f"greedy decode has only {stats['distinct_decode_ids']} distinct tokens"
    if stats["min_greedy_top2_margin"] < MIN_TOP2_MARGIN:
        return f"greedy top-2 margin {stats['min_greedy_top2_margin']:.4f} < {MIN_TOP2_MARGIN}"
    return None


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def save_model(model, out_dir: Path, max_shard_size) -> None:
    kwargs = {}
    params = inspect.signature(model.save_pretrained).parameters
    if "safe_serialization" in params:
        kwargs["safe_serialization"] = True
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    if not any(out_dir.glob("*.safetensors")):
        raise RuntimeError(f"{out_dir}: save_pretrained wrote no safetensors")
    if any(out_dir.glob("*.bin")):
        raise RuntimeError(f"{out_dir}: save_pretrained wrote pickle weights")


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def legacy_config_dict(spec, new_config_path: Path) -> dict:
    """The saved config.json rewritten in the pre-5.x rope/sliding spelling."""
    cfg = json.loads(new_config_path.read_text())
    legacy = dict(spec["legacy_rope"])
    cfg.pop("rope_parameters", None)
    if legacy.pop("drop_layer_types", False):
        cfg.pop("layer_types", None)
        cfg.pop("_sliding_window_pattern", None)
    for key, value in legacy.items():
        cfg[key] = value
    return cfg


def rope_params_of(config) -> dict:
    params = json.loads(json.dumps(config.rope_parameters, sort_keys=True))
    # A legacy `type` key is kept next to the `rope_type` that transformers derives from it
    # (phi3 also maps "su" to "longrope"); only `rope_type` is read.
    if isinstance(params, dict) and "rope_type" in params:
        params.pop("type", None)
    return params


def verify_legacy_equivalent(spec, legacy_path: Path) -> None:
    """Load the legacy spelling with transformers; it must normalize to the same math."""
    cls = type(spec["config"])
    loaded = cls.from_json_file(str(legacy_path))
    want = rope_params_of(spec["config"])
    got = rope_params_of(loaded)
    if got != want:
        raise RuntimeError(f"{legacy_path}: legacy rope spelling loads as {got}, expected {want}")
    if getattr(spec["config"], "layer_types", None) is not None:
        if list(loaded.layer_types) != list(spec["config"].layer_types):
            raise RuntimeError(f"{legacy_path}: layer_types {loaded.layer_types} != {spec['config'].layer_types}")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_one(spec_fn, out_root: Path, versions: dict) -> dict:
    spec = spec_fn()
    name = spec["name"]
    config = spec["config"]
    config._attn_implementation = "eager"
    rejected = []
    for attempt in range(MAX_SEED_ATTEMPTS):
        seed = spec["seed"] + attempt
        torch.manual_seed(seed)
        model = spec["model_cls"](config).to(torch.float32).eval()
        init_summary = rerandomize(model, spec["norm_style"], seed, spec["embed_std"], spec["final_norm_gain"])
        if config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tie broken"
        tensors, stats = make_goldens(model, config, seed)
        problem = degeneracy_problem(stats)
        if problem is None:
            break
        rejected.append({"seed": seed, "why": problem})
    else:
        raise RuntimeError(f"{name}: no seed in {MAX_SEED_ATTEMPTS} attempts gave usable goldens: {rejected[-3:]}")
    effects = feature_effects(spec, model, config, tensors["input_ids"], tensors["prefill_logits"])
    if spec.get("hf_chunked_prefill_check"):
        diff = chunked_prefill_diff(model, config, tensors["input_ids"], tensors["prefill_logits"])
        assert diff < SELF_CONSISTENCY_TOL, f"{name}: HF {PARITY_CHUNK}-token chunked prefill differs by {diff}"
        stats[f"max_abs_diff_hf_prefill_in_{PARITY_CHUNK}_token_chunks_vs_golden"] = diff

    # Optional second golden on a short prompt (phi3: exercises longrope's SHORT factors).
    short = spec.get("short_golden")
    if short is not None:
        short_rejected = []
        for k in range(MAX_SEED_ATTEMPTS):
            short_ids_seed = seed + 11 + k
            short_tensors, short_stats = make_goldens(
                model, config, seed, short["prompt_len"], short["decode_steps"], ids_seed=short_ids_seed
            )
            problem = degeneracy_problem(short_stats)
            if problem is None:
                break
            short_rejected.append({"input_ids_seed": short_ids_seed, "why": problem})
        else:
            raise RuntimeError(f"{name}: no short prompt gave usable goldens: {short_rejected[-3:]}")
        short_effects = feature_effects(
            spec, model, config, short_tensors["input_ids"], short_tensors["prefill_logits"], short["sensitivity"]
        )

    out_dir = out_root / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    save_model(model, out_dir, spec["max_shard_size"])
    save_file(tensors, str(out_dir / "golden.safetensors"), metadata={"format": "pt"})
    if short is not None:
        save_file(short_tensors, str(out_dir / "golden_short.safetensors"), metadata={"format": "pt"})

    # Reload what we saved and confirm it reproduces the goldens.
    reloaded = spec["model_cls"].from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(input_ids=tensors["input_ids"][None], use_cache=False).logits[0]
    reload_diff = (again - tensors["prefill_logits"]).abs().max().item()
    assert reload_diff < SELF_CONSISTENCY_TOL, f"{name}: reloaded model differs by {reload_diff}"
    stats["max_abs_diff_reloaded_vs_golden"] = reload_diff

    sharded = (out_dir / "model.safetensors.index.json").exists()
    if name == "llama" and not sharded:
        raise RuntimeError("llama fixture must be sharded; lower max_shard_size")

    saved_cfg = json.loads((out_dir / "config.json").read_text())
    meta = {
        "arch": saved_cfg.get("architectures", [None])[0],
        "model_type": saved_cfg.get("model_type"),
        "versions": versions,
        "N": PROMPT_LEN,
        "decode_steps": DECODE_STEPS,
        "vocab_size": config.vocab_size,
        "seed": seed,
        "input_ids_seed": seed + 7,
        "rejected_seeds": rejected,
        "embed_std": spec["embed_std"],
        "final_norm_effective_gain": spec["final_norm_gain"],
        "dtype": "float32",
        "attn_implementation": "eager",
        "sharded": sharded,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "features": spec["features"],
        "softcapping": {
            "final_logit_softcapping": saved_cfg.get("final_logit_softcapping", "absent"),
            "attn_logit_softcapping": saved_cfg.get("attn_logit_softcapping", "absent"),
        },
        "config_json_keys": sorted(saved_cfg.keys()),
        "rope_parameters_as_saved": saved_cfg.get("rope_parameters"),
        "feature_effects_max_abs_logit_change_when_disabled": effects,
        "param_init": init_summary,
        "stats": stats,
        "tolerance_used_for_self_consistency": SELF_CONSISTENCY_TOL,
    }
    if short is not None:
        meta["golden_short"] = {
            "file": "golden_short.safetensors",
            "N": short["prompt_len"],
            "decode_steps": short["decode_steps"],
            "input_ids_seed": short_ids_seed,
            "rejected_input_ids_seeds": short_rejected,
            "feature_effects_max_abs_logit_change_when_disabled": short_effects,
            "stats": short_stats,
        }
    write_json(out_dir / "meta.json", meta)

    legacy_dir = out_root / "legacy_configs"
    legacy_dir.mkdir(exist_ok=True)
    legacy_path = legacy_dir / f"{name}.json"
    write_json(legacy_path, legacy_config_dict(spec, out_dir / "config.json"))
    verify_legacy_equivalent(spec, legacy_path)

    size = dir_size(out_dir)
    if size > MAX_FIXTURE_BYTES:
        raise RuntimeError(f"{name}: fixture is {size} bytes, over {MAX_FIXTURE_BYTES}")
    for f in out_dir.iterdir():
        if f.stat().st_size > MAX_FIXTURE_BYTES:
            raise RuntimeError(f"{f}: {f.stat().st_size} bytes, over {MAX_FIXTURE_BYTES}")
    if short is not None:
        effects = dict(effects, **{f"[golden_short] {k}": v for k, v in short_effects.items()})
    return {"name": name, "dir": out_dir, "stats": stats, "effects": effects, "size": size, "decode_ids": tensors["decode_ids"].tolist()}


def build_multimodal_config(out_root: Path) -> Path:
    text = gemma3_spec()["config"]
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=250,
        eoi_token_index=251,
        image_token_index=252,
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    out_dir = out_root / "gemma3_multimodal_config"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg.save_pretrained(out_dir)
    # The nested text config must parse back to the same text model.
    loaded = Gemma3Config.from_pretrained(out_dir)
    assert rope_params_of(loaded.text_config) == rope_params_of(text)
    assert list(loaded.text_config.layer_types) == list(text.layer_types)
    assert loaded.text_config.sliding_window == text.sliding_window
    assert loaded.text_config.query_pre_attn_scalar == text.query_pre_attn_scalar
    return out_dir / "config.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
    parser.add_argument("--out", type=Path, default=default_out)
    names = [spec_fn()["name"] for spec_fn in SPECS]
    parser.add_argument(
        "--only",
        nargs="*",
        choices=names,
        metavar="NAME",
        help=f"build only these fixtures (of {', '.join(names)}); every other file under --out, including "
        "versions.json and gemma3_multimodal_config/ (rewritten only with gemma3 or a full build), is left as it is",
    )
    args = parser.parse_args()
    full_build = not args.only

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    out_root: Path = args.out
    out_root.mkdir(parents=True, exist_ok=True)

    results = []
    for spec_fn in SPECS:
        if not full_build and spec_fn()["name"] not in args.only:
            continue
        results.append(build_one(spec_fn, out_root, versions))
    mm_path = None
    if full_build or "gemma3" in args.only:
        mm_path = build_multimodal_config(out_root)
    if not (out_root / "README.md").exists():
        print(f"warning: {out_root / 'README.md'} (the golden-file convention) is missing", file=sys.stderr)
    if full_build:
        write_json(out_root / "versions.json", versions)

    print(f"transformers {versions['transformers']}, torch {versions['torch']}")
    for r in results:
        s = r["stats"]
        print(
            f"{r['name']:7s} {r['size'] / 1024:7.1f} KiB  logits std {s['prefill_logits_std']:.2f} "
            f"absmax {s['prefill_logits_absmax']:.2f}  distinct argmax {s['distinct_prefill_argmax']}  "
            f"decode {r['decode_ids']}  margin {s['min_greedy_top2_margin']:.3f}  "
            f"self-diff {max(s['max_abs_diff_prefill_vs_full_forward'], s['max_abs_diff_decode_vs_full_forward']):.2e}"
        )
        for label, effect in r["effects"].items():
            print(f"          feature '{label}': logits move by up to {effect:.3f} when disabled")
        for f in sorted(r["dir"].iterdir()):
            print(f"          {f.name:45s} {f.stat().st_size:9d} B")
    if mm_path is not None:
        print(f"multimodal config: {mm_path} ({mm_path.stat().st_size} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
