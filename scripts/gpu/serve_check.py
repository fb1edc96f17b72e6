#!/usr/bin/env python3
"""`kvzip serve --device cuda` on the GPU machine, against `kvzip run --device cuda`.

The GPU machine has no network and takes 64 MiB per call, so the model is random weights at
SmolLM2-135M's shapes with its real tokenizer (scripts/gpu/make_shape_model.py). Starts the
server, compresses one document, sends 8 concurrent greedy streaming requests (urllib, no
client library needed), and compares each answer with `kvzip run` on the same document and
ratio. Random weights give flat logits, where a batched GEMM's different rounding can flip an
argmax late in an answer, so the report gives the matching prefix per answer rather than
asserting equality (equality is asserted by the CPU test with the real model, and batched vs
single-sequence logits on CUDA by tests/tests/batch.rs). Writes JSON to argv[3].

Usage: serve_check.py KVZIP_BIN MODEL_DIR OUT_JSON
"""
import json
import subprocess
import sys
import threading
import time
import urllib.request

DOC = ("The Harbor Street Library opened in 1911 in the town of Millbrook. Its first librarian "
       "was Agnes Whitfield, who ran it for thirty-two years. The building is made of red "
       "sandstone quarried at Cedar Hill. In 1958 a fire destroyed the east wing. ") * 6
QUESTIONS = ["When did the library open?", "Who was the first librarian?",
             "What is the building made of?", "What happened in 1958?",
             "Where is the library?", "How long did Agnes work there?",
             "Where was the sandstone quarried?", "What was destroyed?"]
MAX_TOKENS = 24


def post(base, path, body, stream=False):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def main():
    kvzip, model, out = sys.argv[1:4]
    srv = subprocess.Popen([kvzip, "serve", "--device", "cuda", "--model", model, "--port", "0",
                            "--store", "/tmp/kvzip-serve-check", "--max-batch", "8"],
                           stderr=subprocess.PIPE, text=True)
    base = None
    for line in srv.stderr:
        sys.stderr.write(line)
        if line.startswith("kvzip serve: http://"):
            base = "http://" + line.split("http://")[1].split()[0]
            break
    threading.Thread(target=lambda: [sys.stderr.write(l) for l in srv.stderr], daemon=True).start()
    name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
    t0 = time.time()
    ctx = json.load(post(base, "/v1/contexts", {"text": DOC, "ratio": 0.3}))
    create_s = time.time() - t0
    answers = [None] * len(QUESTIONS)

    def ask(i):
        body = {"model": name, "context_id": ctx["id"], "stream": True, "temperature": 0,
                "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": QUESTIONS[i]}]}
        text = ""
        for raw in post(base, "/v1/chat/completions", body):
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                for c in d.get("choices", []):
                    text += c["delta"].get("content") or ""
        answers[i] = text.strip()

    t0 = time.time()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    batch_s = time.time() - t0
    metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    srv.terminate()
    srv.wait(timeout=60)
    open("/tmp/serve_doc.txt", "w").write(DOC)
    cmd = [kvzip, "run", "--device", "cuda", "--model", model, "--context", "/tmp/serve_doc.txt",
           "--ratio", "0.3", "--max-new-tokens", str(MAX_TOKENS), "--json"]
    for q in QUESTIONS:
        cmd += ["--query", q]
    run = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    expected = [a["answer"] for a in run["answers"]]

    def common_prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rows = [{"question": q, "serve": a, "run": e, "equal": a == e,
             "common_prefix_chars": common_prefix(a, e)}
            for q, a, e in zip(QUESTIONS, answers, expected)]
    steps = [l for l in metrics.splitlines() if l.startswith(("kvzip_decode_steps_total", "kvzip_generated_tokens_total"))]
    json.dump({"context": ctx, "create_s": create_s, "batch_of_8_s": batch_s,
               "equal": sum(r["equal"] for r in rows), "of": len(rows), "answers": rows,
               "ratio_real_run": run["ratio_real"], "metrics": steps}, open(out, "w"), indent=1)
    print("serve vs run equal:", sum(r["equal"] for r in rows), "of", len(rows))


if __name__ == "__main__":
    main()
