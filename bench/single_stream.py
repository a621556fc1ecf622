"""Single-stream decode speed of a running OpenAI-compatible server, measured by the client.

Streams `--tokens` completion tokens (end-of-generation tokens are biased away so every run
decodes the same count, as llama-bench does) and reports decode tokens/s: tokens after the
first, divided by the time from the first to the last chunk. Prefill is excluded, which is what
llama-bench's `tg` test measures too.
"""

import argparse
import json
import statistics
import time

import openai


def run_once(client, model, tokens, ban):
    stream = client.completions.create(
        model=model,
        prompt="The history of the Roman Empire",
        max_tokens=tokens,
        temperature=0,
        logit_bias={str(t): -100 for t in ban},
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    usage = None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    n = usage.completion_tokens
    return (n - 1) / (last - first), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:1234/v1")
    ap.add_argument("--model", default="gemma-3-270m-q4_k_m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ban", default="1,106", help="token ids kept from ending generation")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base, api_key="bench", max_retries=0)
    ban = [int(t) for t in args.ban.split(",") if t]
    run_once(client, args.model, 8, ban)  # warm-up
    speeds = []
    for _ in range(args.runs):
        tps, n = run_once(client, args.model, args.tokens, ban)
        assert n == args.tokens, f"generated {n} tokens, wanted {args.tokens}"
        speeds.append(tps)
    print(json.dumps({"decode_tps_mean": statistics.mean(speeds),
                      "decode_tps_runs": speeds, "tokens": args.tokens}))


if __name__ == "__main__":
    main()
