"""Load generator for concurrent streaming clients, with the official openai SDK (async).

N clients each send R streaming completions one after another; all clients run at once.
Reports aggregate completion tokens/s over the whole run (wall clock), time to first token
(client-side: request sent -> first text chunk) p50/p95, and errors. With --shared-words, every
prompt starts with the same long system prompt, as when several bots share one.

It also probes the prefix cache on an idle server: one request with a fresh system prompt
(cold), then the same system prompt with another question (cached); the TTFT ratio is
reported. Prints one JSON object.
"""

import argparse
import asyncio
import json
import math
import statistics
import time

import openai

WORDS = ["river", "stone", "lantern", "orchard", "copper", "meadow", "harbor", "violet",
         "candle", "glacier", "thistle", "compass"]
QUESTIONS = ["What is a river?", "Describe a mountain.", "Why do stars shine?",
             "How do bees fly?", "Write about the sea.", "What is bread?",
             "Name three colours.", "Explain rain.", "What is a city?", "Describe a cat."]


def system_prompt(tag, words):
    body = " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(words))
    return f"System ({tag}): you are a careful assistant. Follow these rules: {body}\n\n"


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v), max(1, math.ceil(q * len(v)))) - 1]


async def one(client, args, prompt):
    sent = time.perf_counter()
    first = None
    usage = None
    stream = await client.completions.create(
        model=args.model, prompt=prompt, max_tokens=args.tokens, temperature=0,
        logit_bias={str(t): -100 for t in args.ban}, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {"ttft": (first or time.perf_counter()) - sent,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached": (details.cached_tokens or 0) if details else 0}


async def client_loop(client, args, idx, shared, results, errors):
    for r in range(args.requests):
        q = QUESTIONS[(idx * args.requests + r) % len(QUESTIONS)]
        # A distinct preamble per request: nothing for a prefix cache to share.
        own = system_prompt(f"client{idx}-request{r}", args.distinct_words) if args.distinct_words else ""
        prompt = f"{shared}{own}Client {idx}, request {r}. Question: {q}\nAnswer:"
        try:
            results.append(await one(client, args, prompt))
        except Exception as e:  # counted, not fatal: the point is to see them
            errors.append(repr(e))


async def load(args, shared):
    client = openai.AsyncOpenAI(base_url=args.base, api_key="bench", max_retries=0,
                                timeout=600)
    results, errors = [], []
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(client, args, i, shared, results, errors)
                           for i in range(args.clients)))
    wall = time.perf_counter() - start
    ttfts = [r["ttft"] * 1000 for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {"requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "completion_tokens": tokens, "aggregate_tps": tokens / wall,
            "ttft_p50_ms": pct(ttfts, 0.50), "ttft_p95_ms": pct(ttfts, 0.95),
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "cached_tokens": sum(r["cached"] for r in results)}


async def prefix_probe(args):
    """Cold vs cached TTFT for a shared system prompt on an otherwise idle server."""
    client = openai.AsyncOpenAI(base_url=args.base, api_key="bench", max_retries=0,
                                timeout=600)
    cold, warm = [], []
    for k in range(3):
        shared = system_prompt(f"probe{k}-{time.time_ns()}", args.shared_words)
        a = await one(client, args, f"{shared}Question: {QUESTIONS[0]}\nAnswer:")
        b = await one(client, args, f"{shared}Question: {QUESTIONS[1]}\nAnswer:")
        cold.append(a["ttft"] * 1000)
        warm.append(b["ttft"] * 1000)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"cold_ttft_ms": c, "cached_ttft_ms": w, "cached_over_cold": w / c}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:1234/v1")
    ap.add_argument("--model", default="gemma-3-270m-q4_k_m")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--shared-words", type=int, default=0,
                    help="length of the shared system prompt in words (0: none)")
    ap.add_argument("--distinct-words", type=int, default=0,
                    help="a preamble of this many words of its own for every request (0: none)")
    ap.add_argument("--probe", action="store_true", help="also measure cold vs cached TTFT")
    ap.add_argument("--ban", default="1,106", help="token ids kept from ending generation")
    args = ap.parse_args()
    args.ban = [int(t) for t in args.ban.split(",") if t]
    await one(openai.AsyncOpenAI(base_url=args.base, api_key="bench", max_retries=0),
              argparse.Namespace(**{**vars(args), "tokens": 4}), "Warm up.")
    shared = system_prompt("shared", args.shared_words) if args.shared_words else ""
    out = await load(args, shared)
    if args.probe:
        out.update(await prefix_probe(args))
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
