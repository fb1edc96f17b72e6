#!/usr/bin/env python3
"""Writes a random-weight HF checkpoint with the shapes of a given config.json.

For measurements that need a real model directory of a real model's shapes on the GPU
machine (which has no network and takes 64 MiB per call, too little for real weights): peak
host RSS while loading onto a device, end-to-end CLI runs. Speed does not depend on weight
values. Usage: make_shape_model.py CONFIG_DIR OUT_DIR [--dtype float32|bfloat16]
(CONFIG_DIR holds config.json and, optionally, tokenizer files that are copied along).
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    cfg = json.loads((a.config_dir / "config.json").read_text())
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_config(config)
        model = model.to(getattr(torch, a.dtype))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out_dir, safe_serialization=True, max_shard_size="100GB")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        if (a.config_dir / f).exists():
            shutil.copy(a.config_dir / f, a.out_dir / f)
    print("wrote", a.out_dir, sorted(p.name for p in a.out_dir.iterdir()))


if __name__ == "__main__":
    main()
