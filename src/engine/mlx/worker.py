"""opta-lmx MLX worker: serves one MLX model with mlx-lm's BatchGenerator (continuous
batching, prompt caches, sampling) for the Rust server that started it. The server owns
templating, tokenizing, detokenizing, stop strings and parsing; this process only turns
prompt token ids into generated token ids.

Protocol (version 1): messages are JSON objects, each framed by a 4-byte big-endian length,
on stdin (server -> worker) and stdout (worker -> server). stderr is the worker's log.

  server -> worker: submit {id, prompt, max_tokens, temperature, top_p, top_k, min_p,
                            repeat_penalty, presence_penalty, frequency_penalty, logit_bias,
                            logprobs (null, or how many alternatives)}
                    cancel {id}    ping {seq}    shutdown {}
  worker -> server: ready {version, pid, eos}
                    tokens {id, tokens, logprobs?} (one step's tokens for one request;
                                                  logprobs: [[logprob, [[id, logprob]...]]...])
                    done {id, reason, generated} (reason: stop | length)
                    pong {seq, active, rss_bytes}
                    error {id?, message}

The worker exits when stdin closes, so it never outlives the server.
"""

import json
import os
import queue
import resource
import struct
import sys
import threading
import traceback

VERSION = 1


def rss_bytes():
    """Resident memory now (Linux), else the peak (macOS reports it in bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def tokens_msg(rid, tokens, logprobs):
    msg = {"type": "tokens", "id": rid, "tokens": tokens}
    if logprobs is not None:
        msg["logprobs"] = logprobs
    return msg


def main():
    model_path, parallel = sys.argv[1], int(sys.argv[2])
    out = sys.stdout.buffer
    write_lock = threading.Lock()

    def send(msg):
        data = json.dumps(msg).encode()
        with write_lock:
            out.write(struct.pack(">I", len(data)) + data)
            out.flush()

    import mlx.core as mx  # noqa: F401  (fails fast with a clear error when mlx is missing)
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tokenizer = load(model_path)
    eos = sorted(set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]))
    gen = BatchGenerator(model, stop_tokens=[[t] for t in eos],
                         completion_batch_size=parallel, prefill_batch_size=parallel)
    inbox = queue.Queue()

    by_uid = {}

    def read_stdin():
        # Pings are answered here, not between generation steps: a long prefill on a slow CPU
        # must not look like a hang; a frozen or dead process still misses them.
        inp = sys.stdin.buffer
        while True:
            head = inp.read(4)
            if len(head) < 4:
                break
            (n,) = struct.unpack(">I", head)
            msg = json.loads(inp.read(n))
            if msg.get("type") == "ping":
                send({"type": "pong", "seq": msg["seq"], "active": len(by_uid),
                      "rss_bytes": rss_bytes()})
            else:
                inbox.put(msg)
        inbox.put({"type": "shutdown"})

    threading.Thread(target=read_stdin, daemon=True).start()
    send({"type": "ready", "version": VERSION, "pid": os.getpid(), "eos": eos})

    generated, want_logprobs = {}, {}

    def logprobs_of(r, k):
        lp = r.logprobs.astype(mx.float32)
        top = []
        if k:
            idx = mx.argpartition(-lp, kth=k - 1)[:k]
            vals = lp[idx]
            top = sorted(zip(idx.tolist(), vals.tolist()), key=lambda t: -t[1])
        return [float(lp[r.token].item()), [[int(i), float(v)] for i, v in top]]

    def handle(msg):
        kind = msg.get("type")
        if kind == "submit":
            sampler = make_sampler(temp=msg.get("temperature", 0.0), top_p=msg.get("top_p", 0.0),
                                   min_p=msg.get("min_p", 0.0), top_k=msg.get("top_k", 0))
            bias = {int(k): v for k, v in (msg.get("logit_bias") or {}).items()}
            rp = msg.get("repeat_penalty")
            processors = make_logits_processors(
                logit_bias=bias or None,
                repetition_penalty=rp if rp and rp != 1.0 else None,
                presence_penalty=msg.get("presence_penalty") or None,
                frequency_penalty=msg.get("frequency_penalty") or None)
            [uid] = gen.insert([msg["prompt"]], max_tokens=[msg["max_tokens"]],
                               samplers=[sampler], logits_processors=[processors])
            by_uid[uid] = msg["id"]
            generated[uid] = 0
            if msg.get("logprobs") is not None:
                want_logprobs[uid] = int(msg["logprobs"])
        elif kind == "cancel":
            for uid, rid in list(by_uid.items()):
                if rid == msg["id"]:
                    gen.remove([uid])
                    del by_uid[uid], generated[uid]
                    want_logprobs.pop(uid, None)
        elif kind == "shutdown":
            return False
        return True

    while True:
        # Block for work when idle; otherwise take what arrived and step.
        try:
            msg = inbox.get(block=not by_uid)
            if not handle(msg):
                return
            while True:
                if not handle(inbox.get_nowait()):
                    return
        except queue.Empty:
            pass
        except Exception as e:  # a bad message fails that request, not the worker
            send({"type": "error", "id": msg.get("id"), "message": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
            continue
        if not by_uid:
            continue
        steps, step_logprobs = {}, {}
        for r in gen.next_generated():
            rid = by_uid.get(r.uid)
            if rid is None:
                continue
            generated[r.uid] += 1
            if not (r.finish_reason == "stop" and r.token in eos):
                steps.setdefault(rid, []).append(int(r.token))
                if r.uid in want_logprobs:
                    step_logprobs.setdefault(rid, []).append(logprobs_of(r, want_logprobs[r.uid]))
            if r.finish_reason is not None:
                if rid in steps:
                    send(tokens_msg(rid, steps.pop(rid), step_logprobs.pop(rid, None)))
                want_logprobs.pop(r.uid, None)
                send({"type": "done", "id": rid, "reason": r.finish_reason,
                      "generated": generated.pop(r.uid)})
                del by_uid[r.uid]
        for rid, toks in steps.items():
            send(tokens_msg(rid, toks, step_logprobs.get(rid)))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        traceback.print_exc()
        sys.exit(f"opta-lmx MLX worker failed: {e}")
