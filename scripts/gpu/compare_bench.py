#!/usr/bin/env python3
"""Compares two kvzip-bench JSON files (old build, new build) measured in the same GPU call:
means over repetitions (run-all.sh with KVZIP_BENCH_ORDER, e.g. ABBA) and new/old ratios for
prefill, scoring and every decode case (end to end and attention only).
Usage: compare_bench.py OLD.json NEW.json"""
import json, sys, statistics as st
from collections import defaultdict
def load(p):
    d=json.load(open(p)); out=defaultdict(lambda: defaultdict(list))
    for s in d['shapes']:
        name=s['shape']
        out[name]['prefill'].append(s['prefill']['ms'])
        if 'scoring' in s: out[name]['scoring'].append(s['scoring']['scoring_ms'])
        for row in s['decode']:
            for case in ['full','kvzip_pair_0.3','kvzip_head_0.6']:
                out[name][f"{row['context']//1024}K {case} e2e"].append(row[case]['decode_ms_per_token'])
                out[name][f"{row['context']//1024}K {case} attn"].append(row[case]['attention_all_layers_ms'])
    return out
old=load(sys.argv[1]); new=load(sys.argv[2])
for shape in new:
    print(shape)
    for k in new[shape]:
        o=st.mean(old[shape][k]); n=st.mean(new[shape][k])
        print(f"  {k:32s} old {o:9.3f} {['%.3f'%x for x in old[shape][k]]}  new {n:9.3f} {['%.3f'%x for x in new[shape][k]]}  ratio {n/o:.3f}")
