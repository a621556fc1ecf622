"""Decode speed of one server on the two speculation workloads, with the official openai SDK.

edit: re-emit a ~60-line Python file with one rename (what prompt lookup and drafts predict
well); free: a story (little to look up). Each workload runs STREAMS streams at once, greedy,
up to --tokens tokens each; decode tokens/s = completion tokens / (last token - first token),
summed over streams. Prints one JSON object: {workload: {"tps": ..., "tokens": ..., "text": ...}}.
"""

import argparse
import asyncio
import json
import time

import openai

CODE = "\n".join(
    line
    for i in range(6)
    for line in (
        f"def process_{i}(records, limit):",
        f"    result = []",
        f"    for record in records[:limit]:",
        f"        if record.get('active') and record.get('score', 0) > {i * 10}:",
        f"            result.append(record['name'].strip().lower())",
        f"    result.sort()",
        f"    return result",
        "",
        "",
    )
)

WORKLOADS = {
    "edit": [
        {"role": "system", "content": "You are a coding assistant. Answer with code only."},
        {"role": "user", "content": "Rename the variable `result` to `names` everywhere in this "
                                    f"file and output the whole file:\n\n```python\n{CODE}```"},
    ],
    "free": [
        {"role": "user", "content": "Write a long story about a lighthouse keeper who finds a "
                                    "message in a bottle."},
    ],
}


async def one(client, args, messages):
    sent = time.perf_counter()
    first = last = None
    text = []
    tokens = 0
    extra = {"speculation": args.speculation} if args.speculation else {}
    stream = await client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=args.tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    span = (last - first) if first and last and last > first else float("nan")
    return {"tokens": tokens, "decode_s": span, "ttft_s": (first or sent) - sent,
            "text": "".join(text)}


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--speculation", default=None, help="opta-lmx's per-request switch")
    args = p.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base, api_key="none", timeout=3600)
    # One short warm-up so that the first measured request does not pay for page faults.
    await client.chat.completions.create(model=args.model, max_tokens=4, temperature=0,
                                         messages=[{"role": "user", "content": "Hi"}])
    out = {}
    for name, messages in WORKLOADS.items():
        runs = await asyncio.gather(*[one(client, args, messages) for _ in range(args.streams)])
        tps = sum((r["tokens"] - 1) / r["decode_s"] for r in runs)
        out[name] = {"tps": round(tps, 2), "tokens": sum(r["tokens"] for r in runs),
                     "ttft_ms": round(1000 * max(r["ttft_s"] for r in runs)),
                     "text": runs[0]["text"][:80]}
    print(json.dumps(out))


asyncio.run(main())
