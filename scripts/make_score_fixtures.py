#!/usr/bin/env python
"""KVzip score-fidelity fixtures (issue 4 item 5).

For each tiny random-weight parity model in tests/fixtures/parity/<arch>/ this computes the
KVzip context-reconstruction scores with HF transformers, directly from KVZIP-SPEC section 1.2
(a dense implementation, float64 math), and writes tests/fixtures/scores/<arch>.safetensors.

Synthetic setup (tiny models cannot tokenize real text, so every prompt piece is given as ids):
  prefill ids  = sys_ids (12 random ids) ++ ctx_ids (300 random ids)
  chunks       = consecutive slices of ctx_ids of CHUNK_SIZE (128): 0..128, 128..256, 256..300
  scoring input chunk 0  = prompt_first_ids ++ postfix_ids ++ chunk_0
  scoring input chunk i  = prompt_next_ids ++ last HINT_LEN (8) ids of chunk_{i-1} ++ postfix_ids ++ chunk_i
Each scoring input is run on top of (a copy of) the prefill KV cache, positions continuing at
len(sys_ids) + len(ctx_ids). Rotated queries/keys are recomputed from each attention module's
inputs (q_proj/k_proj, q_norm/k_norm if present, the module's RoPE cos/sin) and checked against
the keys transformers stored in its cache. Per scored layer and KV head:
  keys   = [sys rows, rows of chunk i, the q_len rows of the scoring input]
  logits = q . k / sqrt(head_dim)      (NOT the model's own attention scale)
  causal mask inside the self block (input row t sees input keys 0..=t)
  p      = softmax over that key set
  score  = max over the GQA group's query heads and all q_len rows of p at the chunk keys
Gemma3: only `full_attention` layers are scored.

Self-check: the same scores recomputed from ONE non-cached forward over
prefill ids ++ scoring input must agree to 1e-5 (proves the cache path is right).

Run: /work/pyenv/venv/bin/python scripts/make_score_fixtures.py   (CPU, deterministic, ~seconds)
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "fixtures" / "parity"
OUT = ROOT / "tests" / "fixtures" / "scores"
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
N_SYS = 12
N_CTX = 300
CHUNK_SIZE = 128
HINT_LEN = 8
KEEP_RATIO = 0.3
FORMAT = "kvzip-score-fixture/1"


def load_model(model_dir: Path):
    kwargs = {"attn_implementation": "eager"}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers 4.x spelling
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    model.eval()
    return model


def make_ids(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int64)

    return {
        "sys_ids": rand(N_SYS),
        "ctx_ids": rand(N_CTX),
        "prompt_first_ids": rand(7),  # stands for encode("\n\nRepeat the previous context exactly.")
        "prompt_next_ids": rand(11),  # stands for encode("\n\nRepeat the part ... starting with ")
        "postfix_ids": rand(5),  # stands for the chat template's assistant header
    }


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def scoring_input(ids: dict[str, torch.Tensor], i: int, chunks) -> torch.Tensor:
    s, e = chunks[i]
    chunk = ids["ctx_ids"][s:e]
    if i == 0:
        return torch.cat([ids["prompt_first_ids"], ids["postfix_ids"], chunk])
    ps, pe = chunks[i - 1]
    hint = ids["ctx_ids"][ps:pe][-HINT_LEN:]
    return torch.cat([ids["prompt_next_ids"], hint, ids["postfix_ids"], chunk])


class QKCapture:
    """Records each attention module's inputs and recomputes its rotated q and k."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.records: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None] = []
        self.handles = []
        for idx, layer in enumerate(self.layers):
            self.handles.append(
                layer.self_attn.register_forward_pre_hook(self._hook(idx), with_kwargs=True)
            )

    def _hook(self, idx):
        def hook(_module, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            assert hs is not None and pe is not None, "attention inputs not found"
            self.records[idx] = (hs.detach(), tuple(t.detach() for t in pe))

        return hook

    def reset(self):
        self.records = [None] * len(self.layers)

    def qk(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q [Hq, T, D], k [H, T, D]) of layer idx for the last forward."""
        attn = self.layers[idx].self_attn
        hs, (cos, sin) = self.records[idx]
        shape = (*hs.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hs).view(shape).transpose(1, 2)
        k = attn.k_proj(hs).view(shape).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, cos, sin)
        return q[0].double(), k[0].double()


def cache_keys(cache, idx: int) -> torch.Tensor | None:
    if hasattr(cache, "layers"):
        return cache.layers[idx].keys[0]
    if hasattr(cache, "key_cache"):
        return cache.key_cache[idx][0]
    return None


def kvzip_chunk_score(q, keys, n_sys, start, end, q_len) -> torch.Tensor:
    """q [Hq, q_len, D], keys [H, T, D] (float64) -> scores [H, end-start] per KVZIP-SPEC 1.2."""
    n_q, _, d = q.shape
    n_kv, total, _ = keys.shape
    group = n_q // n_kv
    m = end - start
    k_sub = torch.cat(
        [keys[:, :n_sys], keys[:, n_sys + start : n_sys + end], keys[:, total - q_len :]], dim=1
    )
    qv = q.view(n_kv, group, q_len, d)
    logits = torch.einsum("hgtd,hkd->hgtk", qv, k_sub) / math.sqrt(d)
    self_mask = torch.triu(torch.ones(q_len, q_len, dtype=torch.bool), diagonal=1)
    logits[..., n_sys + m :] = logits[..., n_sys + m :].masked_fill(self_mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs[..., n_sys : n_sys + m].amax(dim=(1, 2))


def forward_kwargs(model) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), ("cache_position" in params)


def scored_layers(config) -> list[int]:
    types = getattr(config, "layer_types", None)
    if not types:
        return list(range(config.num_hidden_layers))
    return [i for i, t in enumerate(types) if t == "full_attention"]


@torch.no_grad()
def compute(arch: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model = load_model(PARITY / arch)
    config = model.config
    ids = make_ids(config.vocab_size, seed)
    cap = QKCapture(model)
    cache_kw, has_cache_pos = forward_kwargs(model)
    layers = scored_layers(config)
    chunks = chunk_ranges(N_CTX, CHUNK_SIZE)
    prefill = torch.cat([ids["sys_ids"], ids["ctx_ids"]])
    n_pre = prefill.numel()

    cap.reset()
    cache = DynamicCache(config=config)
    model(input_ids=prefill[None], use_cache=True, **{cache_kw: cache})
    prefill_keys = {l: cap.qk(l)[1] for l in layers}
    for l in layers:  # recomputed keys must equal what transformers cached
        stored = cache_keys(cache, l)
        if stored is not None:
            diff = (stored.double() - prefill_keys[l]).abs().max().item()
            assert diff < 1e-5, f"{arch} layer {l}: recomputed keys differ from cache by {diff}"

    n_kv = config.num_key_value_heads
    scores = torch.zeros(len(layers), n_kv, N_CTX, dtype=torch.float64)
    inputs = []
    max_dev = 0.0
    for i, (s, e) in enumerate(chunks):
        inp = scoring_input(ids, i, chunks)
        inputs.append(inp)
        q_len = inp.numel()
        pos = torch.arange(n_pre, n_pre + q_len, dtype=torch.int64)
        kwargs = {cache_kw: copy.deepcopy(cache), "position_ids": pos[None]}
        if has_cache_pos:
            kwargs["cache_position"] = pos
        cap.reset()
        model(input_ids=inp[None], use_cache=True, **kwargs)
        for j, l in enumerate(layers):
            q, k_in = cap.qk(l)
            keys = torch.cat([prefill_keys[l], k_in], dim=1)
            scores[j, :, s:e] = kvzip_chunk_score(q, keys, N_SYS, s, e, q_len)
            if j == 0 and i == len(chunks) - 1:
                # Probe for testing the score op alone: q as [q_len, n_q_heads, D], keys [H, T, D].
                probe = {
                    "probe_q": q.transpose(0, 1).float().contiguous(),
                    "probe_keys": keys.float().contiguous(),
                    "probe_chunk": torch.tensor([s, e], dtype=torch.int64),
                    "probe_layer": torch.tensor([l], dtype=torch.int64),
                }
        # Self-check: one non-cached forward over prefill ++ input gives the same scores.
        cap.reset()
        model(input_ids=torch.cat([prefill, inp])[None], use_cache=False)
        for j, l in enumerate(layers):
            q, keys = cap.qk(l)
            alt = kvzip_chunk_score(q[:, n_pre:], keys, N_SYS, s, e, q_len)
            max_dev = max(max_dev, (alt - scores[j, :, s:e]).abs().max().item())
    assert max_dev < 1e-5, f"{arch}: cached vs one-shot scores differ by {max_dev}"
    for h in cap.handles:
        h.remove()

    flat = scores.float().flatten()
    n_keep = int(round(KEEP_RATIO * flat.numel()))
    # Exact-count pair selection: higher score first, ties by lower flat (layer, head, pos) index.
    order = sorted(range(flat.numel()), key=lambda x: (-flat[x].item(), x))
    keep = torch.zeros(flat.numel(), dtype=torch.uint8)
    keep[order[:n_keep]] = 1
    boundary = flat[order[n_keep - 1]].item()
    ties = int((flat == boundary).sum().item())

    tensors = {
        "scores": scores.float().contiguous(),
        "scored_layers": torch.tensor(layers, dtype=torch.int64),
        "chunk_size": torch.tensor([CHUNK_SIZE], dtype=torch.int64),
        "hint_len": torch.tensor([HINT_LEN], dtype=torch.int64),
        "scoring_inputs": torch.cat(inputs),
        "scoring_input_lens": torch.tensor([x.numel() for x in inputs], dtype=torch.int64),
        "keep_pair_0_3": keep.view(scores.shape).contiguous(),
        **probe,
        **{k: v.contiguous() for k, v in ids.items()},
    }
    meta = {
        "format": FORMAT,
        "arch": arch,
        "model_dir": f"tests/fixtures/parity/{arch}",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": str(seed),
        "score_scale": "1/sqrt(head_dim)",
        "n_sys": str(N_SYS),
        "n_ctx": str(N_CTX),
        "chunk_size": str(CHUNK_SIZE),
        "keep_ratio": str(KEEP_RATIO),
        "keep_count": str(n_keep),
        "keep_boundary_score": repr(boundary),
        "keep_boundary_ties": str(ties),
        "cached_vs_oneshot_max_abs_diff": f"{max_dev:.3e}",
        "score_min_max": json.dumps([flat.min().item(), flat.max().item()]),
    }
    return tensors, meta


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for n, arch in enumerate(ARCHS):
        if not (PARITY / arch / "config.json").exists():
            raise SystemExit(f"missing parity fixture {PARITY / arch}; run make_parity_fixtures.py first")
        tensors, meta = compute(arch, seed=4000 + n)
        path = OUT / f"{arch}.safetensors"
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        print(f"{arch}: scores {tuple(tensors['scores'].shape)} layers {meta['model_dir']} "
              f"self-check {meta['cached_vs_oneshot_max_abs_diff']} range {meta['score_min_max']} "
              f"boundary ties {meta['keep_boundary_ties']} -> {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
