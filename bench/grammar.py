#!/usr/bin/env python3
"""Decode speed with a grammar active next to without, same server, same model, one run.

    bench/grammar.py BINARY QWEN_GGUF [--runs N]

Streams the same request three times per run: free text, under a JSON schema (an array of
40 short strings, so both answers are long), and free text with tools offered under `auto`
(the lazy tool-call grammar waits for `<tool_call>` the whole answer, scanning what is
written). Decode speed is tokens after the first divided by
the time after the first token; the ratio is grammar / free. Standard library only.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ID = "qwen"
# A tool the question has no use for, so the answer stays text.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 40, "maxItems": 40}},
    "required": ["items"], "additionalProperties": False}


def stream(base, body):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0, first, usage = time.time(), None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            v = json.loads(line[6:])
            if v.get("usage"):
                usage = v["usage"]
            delta = v["choices"][0]["delta"] if v["choices"] else {}
            if (delta.get("content") or delta.get("tool_calls")) and first is None:
                first = time.time()
    end = time.time()
    n = usage["completion_tokens"]
    return (n - 1) / (end - first), n, first - t0


def main():
    binary, model = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    d = tempfile.mkdtemp()
    os.symlink(os.path.abspath(model), os.path.join(d, ID + ".gguf"))
    open(os.path.join(d, "c.yaml"), "w").close()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    proc = subprocess.Popen([binary, "serve", "--config", os.path.join(d, "c.yaml"), "--port",
                             str(port), "--models-dir", d, "--model", ID, "--parallel", "1",
                             "--context", "4096", "--log-level", "warn", "--no-prompt-cache"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        body = {"model": ID, "max_tokens": 300, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "List forty fruits and vegetables, one per line."}]}
        free, constrained, lazy = [], [], []
        for _ in range(runs):
            free.append(stream(base, body))
            constrained.append(stream(base, {**body, "response_format": {
                "type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}}))
            lazy.append(stream(base, {**body, "tools": TOOLS, "tool_choice": "auto"}))
        mean = lambda xs: sum(x[0] for x in xs) / len(xs)
        for name, xs in (("free text", free), ("json_schema grammar", constrained),
                         ("auto tools (lazy)", lazy)):
            print(f"{name:<20} decode {mean(xs):6.1f} tokens/s  "
                  f"(tokens {[x[1] for x in xs]}, ttft {[round(x[2], 3) for x in xs]} s)")
        print(f"ratio grammar / free: {mean(constrained) / mean(free):.2f}x")
        print(f"ratio auto tools (lazy grammar waiting) / free: {mean(lazy) / mean(free):.2f}x")
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
