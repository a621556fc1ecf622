"""Embeddings throughput of two OpenAI-compatible servers side by side: inputs/s and tokens/s
for 1, 64 and 1,024 short inputs per request, from one client and from eight at once. Both
servers run for the whole bench and take turns cell by cell, REPEATS times, and each cell
reports its median, so drift in the machine's speed falls on both alike (one server, then
the other, moved single cells by 20% between runs). Prints a table; bench/embeddings.sh
starts opta-lmx and llama-server on the same GGUF and threads."""
import argparse
import json
import os
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
    ap.add_argument("--opta", required=True, help="opta-lmx's base URL (…/v1)")
    ap.add_argument("--llama", required=True, help="llama-server's base URL (…/v1)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    servers = {name: OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
               for name, url in (("opta", a.opta), ("llama", a.llama))}
    for client in servers.values():
        client.embeddings.create(model=a.model, input="warm up")
    print("inputs x clients | opta-lmx inputs/s (tokens/s) | llama-server inputs/s (tokens/s) | ratio")
    out = {}
    cells = os.environ.get("CELLS", "").split()  # e.g. CELLS="1x1 64x8": only these
    for size, rounds in [(1, 128), (64, 16), (1024, 2)]:
        for clients in [1, 8]:
            if cells and f"{size}x{clients}" not in cells:
                continue
            runs = {name: [] for name in servers}
            for _ in range(a.repeats):
                for name, client in servers.items():
                    runs[name].append(run(client, a.model, size, clients, rounds))
            med = {name: sorted(r, key=lambda x: x["inputs_per_s"])[len(r) // 2]
                   for name, r in runs.items()}
            o, l = med["opta"], med["llama"]
            key = f"{size}x{clients}"
            out[key] = med
            print(f"{key:>16} | {o['inputs_per_s']:8.1f} ({o['tokens_per_s']:7.0f}) | "
                  f"{l['inputs_per_s']:8.1f} ({l['tokens_per_s']:7.0f}) | "
                  f"{o['inputs_per_s'] / l['inputs_per_s']:.2f}x", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
