"""Throughput and constrained decode against one OpenAI-compatible server, for bench/mlx_server.sh
(opta-lmx's MLX path next to mlx-lm's own server on the same model). Prints JSON.

    mlx_server.py --base URL --model NAME clients   # six clients: shared, then distinct prompts
    mlx_server.py --base URL --model NAME grammar   # free vs json_schema decode rate (one stream)
"""

import argparse
import json
import threading
import time

import openai

SHARED = ("You are one of six household assistants. Keep answers short, kind and practical; "
          "prefer lists; never invent facts. ") * 3


def timed_stream(client, model, messages, max_tokens, **extra):
    """Time to first token, tokens after it over the time after it, and the text."""
    sent = time.perf_counter()
    first, last, n, text = None, None, 0, ""
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra)
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else 0
    decode = (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else 0
    return {"ttft_s": (first or time.perf_counter()) - sent, "tokens": tokens,
            "decode_tps": decode, "text": text, "end": time.perf_counter()}


def clients(client, model, tokens):
    out = {}
    for kind in ["shared", "distinct"]:
        results = [None] * 6

        def one(i):
            system = SHARED if kind == "shared" else f"Assistant number {i} of the house {i * 7919}. " + SHARED[:150]
            msgs = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Give me tip number {i + 1} for a tidy kitchen."}]
            results[i] = timed_stream(client, model, msgs, tokens)

        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        total = sum(r["tokens"] for r in results)
        out[kind] = {"wall_s": wall, "tokens": total, "aggregate_tps": total / wall,
                     "ttft_s": [round(r["ttft_s"], 2) for r in results]}
    return out


def grammar(client, model, tokens):
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string"}}}, "required": ["items"]}
    msgs = [{"role": "user", "content": "List many fruits as JSON: {\"items\": [...]}."}]
    free = timed_stream(client, model, msgs, tokens,
                        extra_body={"logit_bias": {"151643": -100, "151645": -100}})
    constrained = timed_stream(client, model, msgs, tokens, response_format={
        "type": "json_schema", "json_schema": {"name": "fruits", "schema": schema}})
    return {"free_tps": free["decode_tps"], "constrained_tps": constrained["decode_tps"],
            "constrained_tokens": constrained["tokens"], "constrained_text": constrained["text"][:80]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("what", choices=["clients", "grammar"])
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base, api_key="bench", max_retries=0, timeout=3600)
    # One warm-up request: the first pays for loading and compiling, on either server.
    timed_stream(client, a.model, [{"role": "user", "content": "Hi"}], 2)
    print(json.dumps(clients(client, a.model, a.tokens) if a.what == "clients"
                     else grammar(client, a.model, a.tokens * 3)))


if __name__ == "__main__":
    main()
