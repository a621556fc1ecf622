"""Loads the model with several settings; prints estimate vs llama.cpp's buffers vs RSS growth."""
import json
import re
import sys
import time
import urllib.request

base, log_path, pid = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = "gemma-3-270m-q4_k_m"
# context, parallel, KV types (K/V), flash attention
SETTINGS = [(1024, 1, "f16", "auto"), (4096, 1, "f16", "auto"), (4096, 8, "f16", "auto"),
            (4096, 8, "q8_0", "auto"), (4096, 8, "q4_0", "auto"), (4096, 8, "f16", "off"),
            (16384, 2, "f16", "auto"), (32768, 1, "f16", "auto"), (32768, 1, "q8_0", "auto")]


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def rss_mb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024 * 1.048576
    return 0.0


def log_size():
    with open(log_path, "rb") as f:
        return len(f.read())


print(f"{'context x parallel':>18} {'kv':>5} {'fa':>5} {'estimate MB':>12} {'llama.cpp MB':>13} {'est/llama':>10} {'RSS growth MB':>14}")
for ctx, par, kv, fa in SETTINGS:
    start, rss0 = log_size(), rss_mb()
    rep = post("/admin/model/load", {"model_id": MODEL, "context": ctx, "parallel": par,
                                     "cache_type_k": kv, "cache_type_v": kv, "flash_attention": fa})
    time.sleep(0.5)
    with open(log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    mib = sum(float(m) for m in re.findall(r"buffer size =\s+([\d.]+) MiB", text))
    grew = rss_mb() - rss0
    est = rep["memory"]["total_bytes"] / 1e6
    got = mib * 1.048576
    print(f"{ctx:>10} x {par:<5} {kv:>5} {fa:>5} {est:12.0f} {got:13.0f} {est / got:10.3f} {grew:14.0f}")
    post("/admin/model/unload", {"model_id": MODEL})
    time.sleep(0.5)
