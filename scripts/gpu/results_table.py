#!/usr/bin/env python3
"""Markdown results table from the GPU benchmark JSONs (stdlib only).

    python3 scripts/gpu/results_table.py bench/gpu/kvzip.json bench/gpu/hf_peer.json > bench/gpu/RESULTS.md

kvzip.json comes from `kvzip-bench` (cargo xtask bench / scripts/gpu/run-all.sh), hf_peer.json from
scripts/gpu/hf_peer.py, both measured in the same call on the same GPU.
"""
import json
import sys


def f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def main() -> None:
    ours = json.load(open(sys.argv[1]))
    peer = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {}
    ceil = ours["ceilings"]
    copy = ceil["copy_bytes_per_s"]
    out = []
    out.append(f"Ceilings measured in the same call: copy {ceil['copy_tb_per_s']:.2f} TB/s, "
               f"bf16 GEMM {ceil['gemm_bf16_tflop_per_s']:.0f} TFLOP/s. Random weights; MFU against 989 TFLOP/s.\n")
    for s in ours["shapes"]:
        name = s["shape"]
        if "error" in s:
            out.append(f"**{name}**: failed: {s['error']}\n")
            continue
        hf = peer.get(f"shape:{name}", {})
        out.append(f"### {name}\n")
        out.append("| measure | kvzip-rs | HF transformers (sdpa, bf16) |")
        out.append("|---|---|---|")
        p = s["prefill"]
        hp = hf.get("prefill_32768", {})
        out.append(f"| prefill {p['tokens']} tokens | {p['ms'] / 1e3:.2f} s, {p['tokens_per_s']:.0f} tok/s, MFU {p['mfu_vs_989']:.2f} "
                   f"| {f(hp.get('seconds'))} s, {f(hp.get('tokens_per_s'), 0)} tok/s, MFU {f(hp.get('mfu_vs_989_tflops'))} |")
        sc = s.get("scoring")
        if sc:
            out.append(f"| KVzip scoring / prefill ({sc['context_tokens']} tokens) | {sc['scoring_over_prefill']:.2f} "
                       f"({sc['scoring_ms'] / 1e3:.2f} s / {sc['prefill_ms'] / 1e3:.2f} s) | reference ≈ 2 |")
        for row in s["decode"]:
            ctx = row["context"]
            hd = hf.get(f"decode_{ctx}", {})
            hn = hf.get(f"decode_{ctx}_no_cudnn", {})
            for label, key in [("full cache", "full"), ("KVzip pair 0.3", "kvzip_pair_0.3"), ("KVzip head 0.6", "kvzip_head_0.6")]:
                c = row[key]
                peer_cell = ""
                if key == "full":
                    peer_cell = f"{f(hd.get('ms_per_token'))} ms (default sdpa) / {f(hn.get('ms_per_token'))} ms (cuDNN off)"
                out.append(f"| decode {ctx // 1024}K, {label}: ms/token (× floor) | {c['decode_ms_per_token']:.2f} "
                           f"({c['ms_over_floor']:.2f}×) | {peer_cell} |")
            full = row["full"]
            out.append(f"| decode {ctx // 1024}K: attention, all layers, per-layer calls | full {full['attention_bytes_per_s'] / 1e12:.2f} TB/s "
                       f"({full['attention_over_copy']:.2f} of copy); 0.3: {row['kvzip_pair_0.3']['attention_bytes_per_s'] / 1e12:.2f} TB/s | |")
            out.append(f"| decode {ctx // 1024}K: ratio-0.3 speed-up, measured / floor-predicted | {row['speedup_0.3_measured']:.2f} / "
                       f"{row['speedup_0.3_floor_predicted']:.2f} = {row['speedup_fraction_of_floor']:.2f} | |")
        out.append("")
    da = peer.get("decode_attention", {})
    if da:
        out.append("Decode attention in PyTorch (Llama-3.1-8B shape, same call):\n")
        out.append("| context | dense sdpa, all layers batched | dense sdpa, per-layer calls | ragged varlen (flash, ratio 0.3) |")
        out.append("|---|---|---|---|")
        for key, v in da.items():
            def tb(k):
                x = v.get(k, {})
                return f(x.get("tb_per_s")) if isinstance(x, dict) else "—"
            out.append(f"| {key.split('@')[1]} | {tb('dense_sdpa_all_layers_batched')} TB/s | {tb('dense_sdpa_per_layer_calls')} TB/s | "
                       f"{tb('ragged_aten_flash_varlen_per_layer')} TB/s |")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
