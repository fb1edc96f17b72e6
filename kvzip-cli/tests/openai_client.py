"""Drives `kvzip serve` with the official openai client (used by tests/serve.rs).

Usage: python openai_client.py BASE_URL API_KEY MODEL CONTEXT_ID MAX_TOKENS QUESTIONS_JSON

Sends one streaming chat completion per question, all at once from threads, greedy, and
prints one JSON object: {"models": [...], "stream": [{"text", "finish_reason", "chunks",
"usage"}...], "plain": {...}} where "plain" is a non-streaming call for the first question.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai


def main() -> None:
    base, key, model, context_id, max_tokens, questions = sys.argv[1:7]
    max_tokens = int(max_tokens)
    questions = json.loads(questions)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
    models = [m.id for m in client.models.list()]

    def stream_one(q: str) -> dict:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"context_id": context_id},
        )
        text, finish, chunks, usage = "", None, 0, None
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return {"text": text, "finish_reason": finish, "chunks": chunks, "usage": usage}

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        streamed = list(pool.map(stream_one, questions))

    plain = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": questions[0]}],
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"context_id": context_id},
    )
    error = None
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"context_id": "ctx-00000000000000000000000000000000"},
        )
    except openai.NotFoundError as e:
        error = {"status": e.status_code, "code": e.code}
    print(json.dumps({
        "models": models,
        "stream": streamed,
        "plain": {
            "text": plain.choices[0].message.content,
            "finish_reason": plain.choices[0].finish_reason,
            "usage": plain.usage.model_dump(),
        },
        "not_found": error,
    }))


if __name__ == "__main__":
    main()
