#!/usr/bin/env python3
"""PyTorch / HF transformers peer for kvzip-rs's GPU benchmark (issue 6, section 5).

Measures, in one process and with random weights (no hub, no network):
  1. device-to-device copy bandwidth (bytes read + written / time),
  2. the bf16 GEMM ceiling (n^3 matmul),
  3. dense and ragged (KVzip-like, varlen) decode-attention bandwidth at the Llama-3.1-8B shape,
  4. per model shape: HF prefill tokens/s + MFU, and HF decode ms/token at each context.

Usage:
  python3 scripts/gpu/hf_peer.py --out $OUT/hf_peer.json \
      [--shapes llama-3.1-8b,qwen2.5-7b-1m] [--contexts 32768,131072] [--decode-steps 16] [--quick]

`--quick` swaps in tiny shapes and contexts so the script runs on a CPU in seconds (smoke test).
Every measurement is wrapped: a failure (e.g. OOM) is recorded under "error" and the rest still runs.
The JSON is rewritten (atomically) after every measurement, so a killed run keeps what it finished.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

H200_BF16_DENSE_PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, FLOP/s

# Full-size shapes (the benchmark targets) and tiny stand-ins used by --quick.
SHAPES = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "qwen2.5-7b-1m": dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064,
        max_position_embeddings=1010000, rms_norm_eps=1e-5, tie_word_embeddings=False,
        use_sliding_window=False, rope_parameters=dict(rope_type="default", rope_theta=10000000.0),
    ),
}
QUICK_SHAPES = {
    "llama-3.1-8b": dict(SHAPES["llama-3.1-8b"], hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=512, vocab_size=1024),
    "qwen2.5-7b-1m": dict(SHAPES["qwen2.5-7b-1m"], hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, intermediate_size=640, vocab_size=1024),
}


# ----------------------------------------------------------------------------------------------
# helpers


class Timer:
    """Times a callable: CUDA events on a GPU, time.perf_counter (after nothing to sync) on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def times_ms(self, fn, iters, warmup=1):
        """Runs fn warmup times untimed, then iters times; returns the list of per-call ms."""
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            out = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out


def summary(ms):
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def free_memory(device):
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mem_info(device):
    if device.type != "cuda":
        return None
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "allocated_gib": torch.cuda.memory_allocated() / 2**30}


class Report:
    """Holds the JSON document and rewrites it atomically after each measurement."""

    def __init__(self, path, doc):
        self.path, self.doc = path, doc

    def save(self):
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2, default=str)
        os.replace(tmp, self.path)

    def measure(self, section, key, fn, deadline):
        """Runs fn() -> dict; stores it (or the error) under doc[section][key]."""
        slot = self.doc.setdefault(section, {})
        if deadline is not None and time.monotonic() > deadline:
            slot[key] = {"skipped": "--max-seconds budget spent"}
            self.save()
            return slot[key]
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - every failure is data, the run goes on
            res = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
            print(f"[hf_peer] {section}/{key} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        res["wall_s"] = round(time.monotonic() - t0, 3)
        slot[key] = res
        self.save()
        return res


# ----------------------------------------------------------------------------------------------
# 1 + 2: copy bandwidth and GEMM ceiling


def bench_copy(device, timer, nbytes, iters):
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer.times_ms(lambda: dst.copy_(src), iters, warmup=2)
    s = summary(ms)
    moved = 2 * n * 2
    del src, dst
    return {"what": "dst.copy_(src) device-to-device, bf16; bytes = read + written",
            "bytes_per_copy": moved, "tb_per_s": moved / (s["median_ms"] * 1e-3) / 1e12,
            "units": "TB/s = 1e12 bytes/s (median of iters)", **s}


def bench_gemm(device, timer, n, iters):
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    ms = timer.times_ms(lambda: torch.matmul(a, b, out=c), iters, warmup=3)
    s = summary(ms)
    flops = 2 * n**3
    del a, b, c
    return {"what": f"bf16 matmul {n}x{n} @ {n}x{n}, FLOPs = 2 n^3", "n": n,
            "tflop_per_s": flops / (s["median_ms"] * 1e-3) / 1e12,
            "fraction_of_989_tflops": flops / (s["median_ms"] * 1e-3) / H200_BF16_DENSE_PEAK_FLOPS,
            "units": "TFLOP/s (median of iters)", **s}


# ----------------------------------------------------------------------------------------------
# 5: decode-attention bandwidth, dense and ragged


def ragged_head_lengths(n_heads, ctx, ratio, sigma, seed):
    """Skewed per-head kept lengths: ctx*ratio*lognormal factor (mean 1), clamped to [1, ctx], rescaled so the
    mean length is ratio*ctx."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.exp(sigma * torch.randn(n_heads, generator=g, dtype=torch.float64) - sigma**2 / 2)
    target = ratio * ctx
    scale = 1.0
    for _ in range(30):
        lens = (factor * target * scale).round().clamp(1, ctx)
        scale *= target / lens.mean().item()
    return [int(x) for x in lens.tolist()]


def bench_decode_attention(device, timer, shape, ctx, ratio, sigma, iters):
    layers, hq, hkv, d = shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    bf = torch.bfloat16
    out = {"shape": dict(layers=layers, q_heads=hq, kv_heads=hkv, head_dim=d), "ctx": ctx,
           "units": "TB/s = (K+V bytes read) / median time / 1e12"}

    def rate(nbytes, fn, label, **extra):
        try:
            ms = timer.times_ms(fn, iters, warmup=3)
            s = summary(ms)
            out[label] = {"tb_per_s": nbytes / (s["median_ms"] * 1e-3) / 1e12, "bytes": nbytes, **s, **extra}
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": f"{type(e).__name__}: {e}"[:1500], **extra}

    # ---- dense: full cache of ctx for every layer
    q = torch.randn(layers, hq, 1, d, dtype=bf, device=device)
    k = torch.randn(layers, hkv, ctx, d, dtype=bf, device=device)
    v = torch.randn(layers, hkv, ctx, d, dtype=bf, device=device)
    dense_bytes = 2 * k.numel() * k.element_size()
    rate(dense_bytes, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), "dense_sdpa_all_layers_batched",
         api="F.scaled_dot_product_attention(q[L,Hq,1,D], k/v[L,Hkv,ctx,D], enable_gqa=True), one call, default backend")
    qg = q.view(layers, hkv, group, d)  # the GQA group as query rows: same math, no K/V expansion
    rate(dense_bytes, lambda: F.scaled_dot_product_attention(qg, k, v), "dense_sdpa_all_layers_group_as_rows",
         api="F.scaled_dot_product_attention(q viewed [L,Hkv,G,D] (group as non-causal query rows), k/v[L,Hkv,ctx,D])")
    layer_views = [(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(layers)]

    def per_layer():
        for ql, kl, vl in layer_views:
            F.scaled_dot_product_attention(ql, kl, vl, enable_gqa=True)
    rate(dense_bytes, per_layer, "dense_sdpa_per_layer_calls",
         api=f"{layers} calls of F.scaled_dot_product_attention(q[1,Hq,1,D], k/v[1,Hkv,ctx,D], enable_gqa=True)")
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue

            def forced(backend=backend):
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "kernel not used because ..." for rejected backends
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            rate(dense_bytes, forced, f"dense_sdpa_all_layers_batched_{name.lower()}",
                 api=f"as dense_sdpa_all_layers_batched, forced SDPBackend.{name}")
    del q, k, v, qg, layer_views
    free_memory(device)

    # ---- ragged KVzip-like layout: each (layer, kv head) is one varlen "sequence" with 1 kv head and
    # the G query heads of its group as MQA heads (the reference KVzip decode path).
    lens = ragged_head_lengths(layers * hkv, ctx, ratio, sigma, seed=1234 + ctx)
    total = sum(lens)
    sl = sorted(lens)
    out["ragged_layout"] = {"ratio": ratio, "lognormal_sigma": sigma, "sequences": len(lens),
                            "kept_fraction": total / (len(lens) * ctx), "len_min": sl[0],
                            "len_median": sl[len(sl) // 2], "len_max": sl[-1],
                            "layout": "q [L*Hkv, G, D]; k/v [sum(len), 1, D] head-major; cu_seqlens_k over (layer, kv head)"}
    ragged_bytes = 2 * total * d * 2
    qr = torch.randn(layers * hkv, group, d, dtype=bf, device=device)
    kr = torch.randn(total, 1, d, dtype=bf, device=device)
    vr = torch.randn(total, 1, d, dtype=bf, device=device)
    cu_k_all = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    cu_q_all = torch.arange(layers * hkv + 1, dtype=torch.int32, device=device)
    max_k = max(lens)
    per_layer_args = []
    for i in range(layers):
        a, b = int(cu_k_all[i * hkv]), int(cu_k_all[(i + 1) * hkv])
        cu_k = (cu_k_all[i * hkv:(i + 1) * hkv + 1] - a).contiguous()
        per_layer_args.append((qr[i * hkv:(i + 1) * hkv], kr[a:b], vr[a:b], cu_k, max(lens[i * hkv:(i + 1) * hkv])))
    cu_q_layer = torch.arange(hkv + 1, dtype=torch.int32, device=device)

    def aten_flash(qx, kx, vx, cq, ck, mk):
        return torch.ops.aten._flash_attention_forward(qx, kx, vx, cq, ck, 1, mk, 0.0, False, False, scale=scale)[0]

    def check(fn_out):
        # sequence 0 (layer 0, kv head 0) against dense sdpa over its own rows
        n0 = lens[0]
        ref = F.scaled_dot_product_attention(qr[0].view(1, 1, group, d).float(), kr[:n0].view(1, 1, n0, d).float(),
                                             vr[:n0].view(1, 1, n0, d).float())
        return float((fn_out[0].float() - ref[0, 0]).abs().max())

    if device.type == "cuda":
        try:
            err = check(aten_flash(qr, kr, vr, cu_q_all, cu_k_all, max_k))
        except Exception:  # noqa: BLE001
            err = None
        rate(ragged_bytes, lambda: aten_flash(qr, kr, vr, cu_q_all, cu_k_all, max_k), "ragged_aten_flash_varlen_all_layers",
             api="torch.ops.aten._flash_attention_forward varlen (cum_seq_q/k), MQA per sequence, one call for all layers",
             max_abs_err_vs_sdpa_seq0=err)

        def aten_per_layer():
            for ql, kl, vl, ck, mk in per_layer_args:
                aten_flash(ql, kl, vl, cu_q_layer, ck, mk)
        rate(ragged_bytes, aten_per_layer, "ragged_aten_flash_varlen_per_layer",
             api=f"torch.ops.aten._flash_attention_forward varlen, {layers} calls (one per layer, as the reference)")
        try:
            from torch.nn.attention.varlen import varlen_attn

            def torch_varlen_gqa():
                return varlen_attn(qr, kr, vr, cu_q_all, cu_k_all, 1, max_k, scale=scale, enable_gqa=True)
            # the group as G non-causal query rows of a single-head sequence: needs no GQA support
            q_rows = qr.reshape(layers * hkv * group, 1, d)
            cu_q_rows = cu_q_all * group

            def torch_varlen_rows():
                return varlen_attn(q_rows, kr, vr, cu_q_rows, cu_k_all, group, max_k, scale=scale)
            try:
                torch_varlen_gqa()
                rate(ragged_bytes, torch_varlen_gqa, "ragged_torch_varlen_attn_all_layers",
                     api="torch.nn.attention.varlen.varlen_attn(q [L*Hkv, G, D], enable_gqa=True), one call for all layers")
            except TypeError:  # torch without enable_gqa on varlen_attn (2.11)
                rate(ragged_bytes, torch_varlen_rows, "ragged_torch_varlen_attn_all_layers",
                     api="torch.nn.attention.varlen.varlen_attn(q [L*Hkv*G, 1, D], group as query rows, "
                         "cu_seq_q = G*arange), one call for all layers (this torch has no enable_gqa)")
        except ImportError as e:
            out["ragged_torch_varlen_attn_all_layers"] = {"error": f"unavailable: {e}"}
        try:
            from flash_attn import flash_attn_varlen_func

            def fa2_per_layer():
                for ql, kl, vl, ck, mk in per_layer_args:
                    flash_attn_varlen_func(ql, kl, vl, cu_q_layer, ck, 1, mk, causal=True)
            rate(ragged_bytes, fa2_per_layer, "ragged_flash_attn_varlen_func_per_layer",
                 api="flash_attn.flash_attn_varlen_func(causal=True), one call per layer (exactly the reference)")
        except ImportError as e:
            out["ragged_flash_attn_varlen_func_per_layer"] = {"error": f"flash_attn not installed: {e}"}

    # portable fallback (and the only ragged path on a CPU): one sdpa call per (layer, kv head)
    head_views = []
    for s, (a, b) in enumerate(zip(cu_k_all.tolist()[:-1], cu_k_all.tolist()[1:])):
        head_views.append((qr[s].view(1, 1, group, d), kr[a:b].view(1, 1, b - a, d), vr[a:b].view(1, 1, b - a, d)))

    def per_head():
        for qh, kh, vh in head_views:
            F.scaled_dot_product_attention(qh, kh, vh)
    rate(ragged_bytes, per_head, "ragged_sdpa_per_head_loop",
         api=f"F.scaled_dot_product_attention once per (layer, kv head): {len(head_views)} calls, group as query rows")
    dense_ref = out.get("dense_sdpa_all_layers_batched", {}).get("tb_per_s")
    if dense_ref:
        out["ragged_over_dense_batched"] = {k2: out[k2]["tb_per_s"] / dense_ref for k2 in out
                                            if k2.startswith("ragged_") and isinstance(out[k2], dict) and "tb_per_s" in out[k2]}
    del qr, kr, vr, per_layer_args, head_views
    free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------
# 3 + 4: HF model prefill and decode


def build_config(shape):
    from transformers import AutoConfig
    kw = {k: v for k, v in shape.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(shape["model_type"], **kw)
    except Exception:  # older API: rope_theta / rope_scaling
        rp = dict(kw.pop("rope_parameters"))
        kw["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            kw["rope_scaling"] = rp
        return AutoConfig.for_model(shape["model_type"], **kw)


def build_model(shape, device):
    """Random bf16 weights created directly on the device (HF's own init, run on the device)."""
    from transformers import AutoModelForCausalLM
    cfg = build_config(shape)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def param_counts(model):
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel() if model.get_output_embeddings() is not None else 0
    return total, embed, head


def new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def fill_cache_random(model, shape, ctx, device):
    """A DynamicCache of ctx tokens per layer filled with random bf16 K/V through its update() API."""
    cache = new_cache(model)
    hkv, d = shape["num_key_value_heads"], shape["head_dim"]
    for layer in range(shape["num_hidden_layers"]):
        k = torch.randn(1, hkv, ctx, d, dtype=torch.bfloat16, device=device)
        v = torch.randn(1, hkv, ctx, d, dtype=torch.bfloat16, device=device)
        cache.update(k, v, layer)
        del k, v
    return cache


def fill_cache_prefill(model, shape, ctx, device, chunk):
    cache = new_cache(model)
    vocab = shape["vocab_size"]
    with torch.inference_mode():
        for start in range(0, ctx, chunk):
            ids = torch.randint(0, vocab, (1, min(chunk, ctx - start)), device=device)
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def bench_prefill(model, shape, device, timer, tokens, warm_tokens, reps, gemm_tflops, n_nonembed):
    vocab = shape["vocab_size"]
    with torch.inference_mode():
        warm = torch.randint(0, vocab, (1, warm_tokens), device=device)
        model(input_ids=warm, use_cache=False, logits_to_keep=1)
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        ms = timer.times_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), reps, warmup=0)
    s = summary(ms)
    secs = s["median_ms"] * 1e-3
    L, hq, d = shape["num_hidden_layers"], shape["num_attention_heads"], shape["head_dim"]
    linear_flops = 2 * n_nonembed * tokens
    attn_flops = 2 * 2 * L * hq * d * tokens**2 / 2
    achieved = (linear_flops + attn_flops) / secs
    return {"what": "HF forward over random ids, use_cache=False, logits_to_keep=1, inference_mode, sdpa, bf16",
            "tokens": tokens, "warmup_tokens": warm_tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "flops_linear": linear_flops, "flops_attention_causal": attn_flops,
            "achieved_tflop_per_s": achieved / 1e12, "mfu_vs_989_tflops": achieved / H200_BF16_DENSE_PEAK_FLOPS,
            "mfu_vs_measured_gemm": achieved / (gemm_tflops * 1e12) if gemm_tflops else None,
            "flops_definition": "2*params(excluding embedding and lm_head)*tokens + 2*2*layers*q_heads*head_dim*tokens^2/2",
            **s, "memory": mem_info(device)}


def make_decode_cache(model, shape, device, timer, ctx, fill, chunk):
    """Returns (cache, how it was filled, fill seconds)."""
    t0 = time.monotonic()
    if fill == "random":
        cache = fill_cache_random(model, shape, ctx, device)
        how = "DynamicCache.update() per layer with random bf16 K/V of [1, kv_heads, ctx, head_dim] (no prefill)"
    else:
        cache = fill_cache_prefill(model, shape, ctx, device, chunk)
        how = f"chunked HF prefill of random ids, {chunk} tokens per chunk, into a DynamicCache"
    timer.sync()
    return cache, how, time.monotonic() - t0


def sdpa_backend_context(variant, device):
    """default: PyTorch's own sdpa choice (cuDNN on an H200 with torch 2.11); no_cudnn: every backend but cuDNN."""
    import contextlib
    if variant == "default" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def bench_decode(model, shape, device, timer, ctx, steps, cache_info, variant, weight_bytes, copy_tbs):
    cache, how, fill_s = cache_info
    vocab = shape["vocab_size"]
    ms = []
    start_len = cache.get_seq_length()
    with torch.inference_mode(), sdpa_backend_context(variant, device):
        ids = torch.randint(0, vocab, (1, 1), device=device)
        warm = 2
        for step in range(warm + steps):
            timer.sync()
            t = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            ids = logits[:, -1:].argmax(-1)
            timer.sync()
            if step >= warm:
                ms.append((time.perf_counter() - t) * 1e3)
    s = summary(ms)
    kv_bytes = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * ctx * 2
    res = {"what": "greedy single-token HF forward steps (use_cache, DynamicCache, sdpa, bf16); "
                   "per step: synchronize, perf_counter, forward + argmax, synchronize; median over steps",
           "sdpa_backends": variant, "ctx": ctx, "cache_len_at_start": start_len, "cache_fill": how,
           "cache_fill_s": fill_s, "steps": steps, "ms_per_token": s["median_ms"],
           "kv_bytes": kv_bytes, "weight_bytes_read_per_token": weight_bytes, **s, "memory": mem_info(device)}
    if copy_tbs:
        floor_ms = (weight_bytes + kv_bytes) / (copy_tbs * 1e12) * 1e3
        res["bandwidth_floor_ms"] = floor_ms
        res["over_floor"] = s["median_ms"] / floor_ms
        res["floor_definition"] = "(weight bytes excluding embedding table + full K/V bytes) / measured copy TB/s"
    return res


def bench_shape(name, shape, args, device, timer, report, deadline, gemm_tflops, copy_tbs):
    sec = f"shape:{name}"
    report.doc.setdefault(sec, {})["config"] = shape
    holder = {}

    def init():
        t0 = time.monotonic()
        holder["model"] = build_model(shape, device)
        timer.sync()
        total, embed, head = param_counts(holder["model"])
        holder["n_nonembed"] = total - embed - head
        holder["weight_bytes"] = (total - embed) * 2  # embedding: one row per token; lm_head read in full
        return {"init_s": time.monotonic() - t0, "params_total": total, "params_embedding": embed,
                "params_lm_head": head, "params_excluding_embedding_and_lm_head": total - embed - head,
                "attn_implementation": holder["model"].config._attn_implementation,
                "dtype": str(next(holder["model"].parameters()).dtype), "memory": mem_info(device)}
    report.measure(sec, "model", init, deadline)
    if "model" not in holder:
        return
    try:
        for tokens in args.prefill_lengths:
            report.measure(sec, f"prefill_{tokens}", lambda: bench_prefill(
                holder["model"], shape, device, timer, tokens, min(args.prefill_warmup, tokens), args.prefill_reps,
                gemm_tflops, holder["n_nonembed"]), deadline)
            free_memory(device)
        for ctx in args.contexts:
            try:
                cache_info = make_decode_cache(holder["model"], shape, device, timer, ctx, args.cache_fill, args.fill_chunk)
            except Exception as e:  # noqa: BLE001
                report.doc[sec][f"decode_{ctx}"] = {"error": f"cache fill: {type(e).__name__}: {e}"[:2000]}
                report.save()
                free_memory(device)
                continue
            for variant in args.decode_sdpa:
                key = f"decode_{ctx}" if variant == "default" else f"decode_{ctx}_{variant}"
                report.measure(sec, key, lambda: bench_decode(
                    holder["model"], shape, device, timer, ctx, args.decode_steps, cache_info, variant,
                    holder["weight_bytes"], copy_tbs), deadline)
            del cache_info
            free_memory(device)
    finally:
        holder.clear()
        free_memory(device)


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--shapes", default="llama-3.1-8b,qwen2.5-7b-1m", help=f"comma list of {sorted(SHAPES)}; '' = none")
    p.add_argument("--contexts", default=None, help="decode contexts, tokens (default 32768,131072; quick 256,512)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prefill-lengths", default=None, help="prefill lengths, tokens (default 32768; quick 256)")
    p.add_argument("--prefill-warmup", type=int, default=None, help="warm-up prefill length (default 4096; quick 64)")
    p.add_argument("--prefill-reps", type=int, default=2, help="timed prefill repetitions (median reported)")
    p.add_argument("--cache-fill", choices=["random", "prefill"], default="random",
                   help="decode cache: random K/V via DynamicCache.update (default) or chunked prefill")
    p.add_argument("--decode-sdpa", default="default,no_cudnn",
                   help="HF decode sdpa backend variants: default (PyTorch's pick) and/or no_cudnn")
    p.add_argument("--fill-chunk", type=int, default=8192, help="chunk for --cache-fill prefill")
    p.add_argument("--attn-shape", default="llama-3.1-8b", help="shape for the decode-attention bandwidth test; '' = skip")
    p.add_argument("--ratio", type=float, default=0.3, help="KVzip keep ratio for the ragged layout")
    p.add_argument("--skew-sigma", type=float, default=0.8, help="lognormal sigma of per-head length skew")
    p.add_argument("--copy-gib", type=float, default=None, help="copy size, GiB (default 4; quick 1/16)")
    p.add_argument("--gemm-n", type=int, default=None, help="GEMM size (default 8192; quick 512)")
    p.add_argument("--max-seconds", type=float, default=0, help="skip remaining measurements after this (0 = no limit)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and contexts (CPU smoke test)")
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    a.contexts = ints(a.contexts or ("256,512" if a.quick else "32768,131072"))
    a.prefill_lengths = ints(a.prefill_lengths or ("256" if a.quick else "32768"))
    a.prefill_warmup = a.prefill_warmup or (64 if a.quick else 4096)
    a.copy_gib = a.copy_gib or (1 / 16 if a.quick else 4.0)
    a.gemm_n = a.gemm_n or (512 if a.quick else 8192)
    a.decode_sdpa = [v.strip() for v in a.decode_sdpa.split(",") if v.strip()]
    if any(v not in ("default", "no_cudnn") for v in a.decode_sdpa):
        p.error("--decode-sdpa takes default and/or no_cudnn")
    a.shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    for s in a.shapes + ([a.attn_shape] if a.attn_shape else []):
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; known: {sorted(SHAPES)}")
    return a


def environment(device):
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(device), "hostname": platform.node()}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(device_name=prop.name, device_memory_gib=prop.total_memory / 2**30, sm_count=prop.multi_processor_count,
                   capability=f"{prop.major}.{prop.minor}", cuda=torch.version.cuda)
        try:
            env["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
            env["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
        except Exception:  # noqa: BLE001
            pass
    else:
        env.update(device_name=platform.processor() or "cpu", threads=torch.get_num_threads())
    return env


def print_table(doc):
    def g(d, *ks):
        for k in ks:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def f(x, fmt):
        return "   -" if x is None else format(x, fmt)
    rows = [("copy bandwidth (TB/s)", f(g(doc, "baseline", "copy", "tb_per_s"), ".4g")),
            ("bf16 GEMM (TFLOP/s)", f(g(doc, "baseline", "gemm", "tflop_per_s"), ".4g"))]
    for key, val in doc.get("decode_attention", {}).items():
        if not isinstance(val, dict):
            continue
        for label, m in val.items():
            if isinstance(m, dict) and ("tb_per_s" in m or "error" in m) and label.startswith(("dense", "ragged_")):
                rows.append((f"{key} {label} (TB/s)", f(m.get("tb_per_s"), ".4g") if "tb_per_s" in m else "error"))
    for sec, val in doc.items():
        if not sec.startswith("shape:"):
            continue
        for key, m in val.items():
            if key.startswith("prefill_"):
                rows.append((f"{sec[6:]} {key} tok/s | MFU", f"{f(g(m, 'tokens_per_s'), '.0f')} | {f(g(m, 'mfu_vs_989_tflops'), '.3g')}"
                             if "error" not in m else "error"))
            if key.startswith("decode_"):
                rows.append((f"{sec[6:]} {key} ms/token | x floor", f"{f(g(m, 'ms_per_token'), '.2f')} | {f(g(m, 'over_floor'), '.1f')}"
                             if "error" not in m else "error"))
    w = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows))


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    warnings.filterwarnings("ignore", category=FutureWarning)  # `past_key_values` renamed in newer transformers
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    timer = Timer(device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    deadline = time.monotonic() + args.max_seconds if args.max_seconds > 0 else None
    doc = {"what": "PyTorch/HF transformers peer for kvzip-rs's GPU benchmark (random weights, bf16, sdpa)",
           "quick": args.quick, "args": vars(args), "environment": environment(device),
           "peak_flops_for_mfu": H200_BF16_DENSE_PEAK_FLOPS, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report = Report(args.out, doc)
    report.save()
    t_start = time.monotonic()
    copy = report.measure("baseline", "copy", lambda: bench_copy(device, timer, int(args.copy_gib * 2**30), 10), deadline)
    free_memory(device)
    gemm = report.measure("baseline", "gemm", lambda: bench_gemm(device, timer, args.gemm_n, 10), deadline)
    free_memory(device)
    copy_tbs, gemm_tflops = copy.get("tb_per_s"), gemm.get("tflop_per_s")
    if args.attn_shape:
        for ctx in args.contexts:
            report.measure("decode_attention", f"{args.attn_shape}@{ctx}", lambda: bench_decode_attention(
                device, timer, shapes[args.attn_shape], ctx, args.ratio, args.skew_sigma, 20), deadline)
            free_memory(device)
            if copy_tbs and isinstance(doc["decode_attention"].get(f"{args.attn_shape}@{ctx}"), dict):
                d = doc["decode_attention"][f"{args.attn_shape}@{ctx}"]
                d["over_copy_bandwidth"] = {k: m["tb_per_s"] / copy_tbs for k, m in d.items()
                                            if isinstance(m, dict) and "tb_per_s" in m}
                report.save()
    for name in args.shapes:
        bench_shape(name, shapes[name], args, device, timer, report, deadline, gemm_tflops, copy_tbs)
    doc["total_wall_s"] = time.monotonic() - t_start
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report.save()
    print_table(doc)
    print(f"\n[hf_peer] wrote {args.out} in {doc['total_wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
