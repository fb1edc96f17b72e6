#!/usr/bin/env python3
"""Headline table of the README's Evaluation section from `kvzip report` JSON summaries.

Usage: python3 scripts/eval/headline.py bench/eval/<model>/report/*.json
Prints, per task and ratio (0.5, 0.3, 0.2), every method's score with its 95 % bootstrap
interval, and which methods KVzip beats outside the intervals (KVzip's lower bound above the
other method's upper bound).
"""
import json
import sys

METHODS = ["kvzip", "kvzip-plus", "kvzip-head", "snapkv", "pyramidkv", "h2o", "streaming",
           "tova", "knorm", "keydiff", "expected-attention"]


def cell(row):
    return f"{row['score']:.1f} [{row['ci_low']:.0f}, {row['ci_high']:.0f}]"


def main(paths):
    print("| task (contexts / queries) | ratio | full | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    verdicts = []
    for path in paths:
        d = json.load(open(path))
        by = {m: {r["ratio"]: r for r in rows} for m, rows in d["methods"].items()}
        full = by["kvzip"].get(1.0)
        for ratio in (0.5, 0.3, 0.2):
            cells = [cell(by[m][ratio]) if m in by and ratio in by[m] else "" for m in METHODS]
            name = f"{d['data']} ({d['n_examples']} / {d['n_queries']})"
            print(f"| {name} | {ratio} | {cell(full) if full else ''} | " + " | ".join(cells) + " |")
            k = by["kvzip"].get(ratio)
            if not k:
                continue
            beaten = [m for m in METHODS[1:] if m in by and ratio in by[m]
                      and k["ci_low"] > by[m][ratio]["ci_high"]]
            not_beaten = [m for m in METHODS[1:] if m in by and ratio in by[m] and m not in beaten]
            keep = k["score"] / full["score"] if full and full["score"] else float("nan")
            verdicts.append(f"- {d['data']} @ {ratio}: KVzip keeps {keep:.0%} of the full-cache score; "
                            f"beats outside the intervals: {', '.join(beaten) or 'none'}; "
                            f"not separated from: {', '.join(not_beaten) or 'none'}")
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main(sys.argv[1:])
