"""Embeddings throughput against one OpenAI-compatible server: inputs/s and tokens/s for 1,
64 and 1,024 short inputs per request, from one client and from eight at once. Prints one
JSON object; bench/embeddings.sh runs it against opta-lmx and llama-server side by side."""
import argparse
import json
import threading
import time

from openai import OpenAI


def texts(n, salt):
    return [f"Note {salt}-{i}: the household bot stored reminder number {i * 7 + salt} for later."
            for i in range(n)]


def run(client, model, size, clients, rounds):
    results = []

    def one(c):
        for r in range(rounds):
            res = client.embeddings.create(model=model, input=texts(size, c * 1000 + r),
                                           encoding_format="float")
            results.append((len(res.data), res.usage.prompt_tokens))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    inputs = sum(n for n, _ in results)
    tokens = sum(t for _, t in results)
    return {"inputs_per_s": inputs / wall, "tokens_per_s": tokens / wall, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    client = OpenAI(base_url=a.base, api_key="x", max_retries=0, timeout=600)
    client.embeddings.create(model=a.model, input="warm up")
    out = {}
    for size, rounds in [(1, 64), (64, 4), (1024, 1)]:
        for clients in [1, 8]:
            out[f"{size}x{clients}"] = run(client, a.model, size, clients, rounds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
