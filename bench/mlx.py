#!/usr/bin/env python3
"""MLX worker next to llama.cpp on the same model, one server, one run.

    bench/mlx.py BINARY MLX_DIR GGUF_FILE MLX_PYTHON [--tokens N]

Loads the MLX copy and the GGUF copy of Qwen2.5-Coder 0.5B side by side and measures, for each,
single-stream decode tokens/s (tokens after the first over the time after the first) and
six-client aggregate tokens/s (all completion tokens over the wall time), then the MLX
worker's idle resident memory (VmRSS of its process). Standard library only.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return r


def stream(base, model, prompt, n):
    body = {"model": model, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {"151643": -100, "151645": -100},
            "messages": [{"role": "user", "content": prompt}]}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0, first, usage = time.time(), None, None
    with urllib.request.urlopen(req, timeout=1800) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            v = json.loads(line[6:])
            if v.get("usage"):
                usage = v["usage"]
            if v["choices"] and v["choices"][0]["delta"].get("content") and first is None:
                first = time.time()
    return t0, first, time.time(), usage["completion_tokens"]


def main():
    binary, mlx_dir, gguf, python = sys.argv[1:5]
    n = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 16
    d = tempfile.mkdtemp()
    os.symlink(os.path.abspath(mlx_dir), os.path.join(d, "mlx"))
    os.symlink(os.path.abspath(gguf), os.path.join(d, "gguf.gguf"))
    open(os.path.join(d, "c.yaml"), "w").close()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    env = {**os.environ, "OPTA_LMX_MLX_PYTHON": python}
    proc = subprocess.Popen([binary, "serve", "--config", os.path.join(d, "c.yaml"), "--port",
                             str(port), "--models-dir", d, "--parallel", "6", "--context", "1024",
                             "--log-level", "warn", "--no-prompt-cache"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        for m in ("gguf", "mlx"):
            post(base, "/admin/models/load", {"model_id": m})
        rows = {}
        for m in ("gguf", "mlx"):
            stream(base, m, "Say hi.", 2)  # warm up
            t0, first, end, toks = stream(base, m, "Tell me about the sea.", n)
            single = (toks - 1) / (end - first)
            results = [None] * 6

            def one(i):
                results[i] = stream(base, m, f"Tell me about the number {i}.", n)
            threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
            t0 = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - t0
            six = sum(r[3] for r in results) / wall
            rows[m] = (single, six)
            print(f"{m:5} single-stream decode {single:7.2f} tok/s   six clients {six:7.2f} tok/s")
        print(f"ratio MLX / llama.cpp: single {rows['mlx'][0] / rows['gguf'][0]:.3f}x, "
              f"six clients {rows['mlx'][1] / rows['gguf'][1]:.3f}x")
        status = json.load(urllib.request.urlopen(base + "/admin/status"))
        pid = next(x["worker_pid"] for x in status["loaded_models"] if x["id"] == "mlx")
        time.sleep(1)
        rss = next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
        print(f"MLX worker (pid {pid}) idle {rss.split(':')[1].strip()}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
