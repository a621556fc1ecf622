"""opta-lmx MLX worker: serves one MLX model with mlx-lm's BatchGenerator (continuous
batching, sampling) for the Rust server that started it. The server owns templating,
tokenizing, detokenizing, stop strings and parsing; this process turns prompt token ids into
generated token ids, keeps finished sequences' KV as reusable prefixes (in memory, and on disk
once the server names a directory), and enforces grammars with llguidance.

Protocol (version 2): messages are JSON objects, each framed by a 4-byte big-endian length,
on stdin (server -> worker) and stdout (worker -> server). stderr is the worker's log.
argv: MODEL_DIR PARALLEL [SETTINGS_JSON]; settings: {cache_bytes, draft (a model folder or
null), num_draft}.

  server -> worker: submit {id, prompt, max_tokens, temperature, top_p, top_k, min_p,
                            repeat_penalty, presence_penalty, frequency_penalty, logit_bias,
                            logprobs (null, or how many alternatives),
                            grammar (GBNF or null), triggers ([regex], lazy grammar),
                            speculate ("draft", "ngram" or null)}
                    cancel {id}    ping {seq}    shutdown {}
                    disk {dir, key (hex), min_tokens}     (the disk tier is ready)
                    trim_cache {seq, bytes}               (drop prefixes past `bytes`)
  worker -> server: ready {version, pid, eos}
                    tokens {id, tokens, logprobs?, cached?} (one step's tokens for one request;
                                  logprobs: [[logprob, [[id, logprob]...]]...]; `cached`, on the
                                  first, is how many prompt tokens came from the prefix cache)
                    done {id, reason, generated}          (reason: stop | length)
                    pong {seq, active, rss_bytes, cache, spec} (prefix-cache and speculation
                                                          figures)
                    trimmed {seq, cache}     saved {}     (a prefix file was written)
                    error {id?, message, param?}          (param: the request field at fault)

The worker exits when stdin closes, so it never outlives the server.
"""

import copy
import hashlib
import io
import json
import os
import queue
import re
import resource
import struct
import sys
import threading
import traceback

VERSION = 2
MAGIC = b"OPTAKV01"
# A request sharing at least this many prompt tokens with one still prefilling waits for that
# prefill and starts from its KV (six bots with one system prompt arriving together) instead of
# computing the same tokens beside it. It saves the shared work; what it costs the waiter
# depends on how well a batch of prefills shares the hardware (measured on a 2-core CPU with
# OpenBLAS, six such clients: 1.11x mlx_lm.server's tokens/s, median of three).
MIN_SHARE = 32
# How long work that wakes an idle worker waits for more to arrive (see the main loop).
COALESCE_S = 0.005


def rss_bytes():
    """Resident memory now (Linux), else the peak (macOS reports it in bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DiskTier:
    """Prefix files in the server's format (src/engine/llama/prompt_cache.rs): magic, layout
    key, tokens, state length, state SHA-256, state. The state is mlx-lm's safetensors form
    of the cache. A file that is truncated, altered or of another layout is deleted, never
    loaded. The server bounds the whole directory tree (every model, both formats)."""

    def __init__(self, directory, key, min_tokens, on_saved):
        from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache
        self._load, self._save = load_prompt_cache, save_prompt_cache
        self.dir, self.key, self.min_tokens = directory, key, min_tokens
        self.on_saved = on_saved
        os.makedirs(directory, exist_ok=True)
        self.entries = {}  # path -> tokens
        self.hits = 0
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if not name.endswith(".kv"):
                os.unlink(path)  # a write or a restore cut short
                continue
            try:
                with open(path, "rb") as f:
                    self.entries[path] = self._header(f)
            except (OSError, ValueError) as e:
                self.drop(path, e)

    def _header(self, f):
        if f.read(8) != MAGIC or f.read(32) != self.key:
            raise ValueError("not a prompt-cache file of this layout")
        raw = f.read(4)
        if len(raw) < 4:
            raise ValueError("no token count")
        (n,) = struct.unpack("<I", raw)
        if n > 1 << 24:
            raise ValueError("absurd token count")
        raw = f.read(4 * n)
        if len(raw) < 4 * n:
            raise ValueError("tokens cut short")
        return list(struct.unpack(f"<{n}i", raw))

    def drop(self, path, why):
        print(f"opta-lmx MLX worker: deleting an unusable prompt-cache file {path}: {why}",
              file=sys.stderr)
        self.entries.pop(path, None)
        try:
            os.unlink(path)
        except OSError:
            pass

    def best(self, prompt, cap, skip=()):
        """The file sharing the longest prefix with `prompt` (at most `cap` tokens of it)."""
        best, n = None, 0
        for path, toks in self.entries.items():
            if path in skip:
                continue
            m = min(common_prefix(toks, prompt), cap)
            if m > n:
                best, n = path, m
        return best, n

    def holds(self, tokens):
        self.entries = {p: t for p, t in self.entries.items() if os.path.exists(p)}
        return any(len(t) >= len(tokens) and t[:len(tokens)] == tokens
                   for t in self.entries.values())

    def load(self, path):
        tokens = self.entries.get(path)
        try:
            with open(path, "rb") as f:
                if self._header(f) != tokens:
                    raise ValueError("tokens differ from the index")
                head = f.read(40)
                if len(head) < 40:
                    raise ValueError("no state length or hash")
                (length,) = struct.unpack("<Q", head[:8])
                state = f.read(length + 1)
            if len(state) != length:
                raise ValueError("length does not match")
            if hashlib.sha256(state).digest() != head[8:]:
                raise ValueError("state hash does not match")
            tmp = path + ".safetensors"  # mlx-lm's loader goes by the extension
            with open(tmp, "wb") as f:
                f.write(state)
            try:
                cache = self._load(tmp)
            finally:
                os.unlink(tmp)
            os.utime(path)
            self.hits += 1
            return cache
        except (OSError, ValueError, RuntimeError) as e:
            self.drop(path, e)
            return None

    def save(self, tokens, cache):
        """Writes in a thread (the state is serialised here: MLX arrays stay on this one)."""
        if len(tokens) < self.min_tokens or self.holds(tokens):
            return None
        buf = io.BytesIO()
        self._save(buf, cache)
        state = buf.getvalue()
        name = hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:24]
        path = os.path.join(self.dir, name + ".kv")
        superseded = [p for p, t in self.entries.items()
                      if len(t) < len(tokens) and tokens[:len(t)] == t]
        for p in superseded:
            self.entries.pop(p, None)
        self.entries[path] = list(tokens)
        data = b"".join([MAGIC, self.key, struct.pack("<I", len(tokens)),
                         struct.pack(f"<{len(tokens)}i", *tokens),
                         struct.pack("<Q", len(state)), hashlib.sha256(state).digest(), state])

        def write():
            tmp = path + ".tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                for p in superseded:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
                self.on_saved()
            except OSError as e:
                print(f"opta-lmx MLX worker: could not save a prefix: {e}", file=sys.stderr)
                self.entries.pop(path, None)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

        t = threading.Thread(target=write, daemon=False)
        t.start()
        return t


class Prefixes:
    """Finished (and cancelled) sequences' KV, reusable by any later prompt that starts with
    the same tokens: the next turn of a conversation, the same system prompt and tools across
    clients. Bounded in bytes; the least recently used go first, to disk when long enough."""

    def __init__(self, max_bytes):
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
        self.can_trim, self.trim = can_trim_prompt_cache, trim_prompt_cache
        self.max_bytes = max_bytes
        self.entries = []  # [tokens, cache, nbytes, last_used]
        self.clock = 0
        self.disk = None
        self.writes = []
        self.hits = 0
        self.cached_tokens = 0

    @property
    def nbytes(self):
        return sum(e[2] for e in self.entries)

    def figures(self):
        return {"bytes": self.nbytes, "entries": len(self.entries), "hits": self.hits,
                "cached_tokens": self.cached_tokens,
                "disk_files": None if self.disk is None else len(self.disk.entries),
                "disk_hits": 0 if self.disk is None else self.disk.hits}

    def peek(self, prompt):
        """How many tokens of `prompt` memory could give, without copying anything."""
        best = 0
        for e in self.entries:
            m = common_prefix(e[0], prompt)
            if m == len(e[0]) or self.can_trim(e[1]):
                best = max(best, min(m, len(prompt) - 1))
        return best

    def fetch(self, prompt):
        """A cache holding the longest reusable prefix of `prompt`, the tokens still to
        compute and how many were reused. At least one token is always left to compute."""
        cap = len(prompt) - 1
        best, n = None, 0
        for e in self.entries:
            m = min(common_prefix(e[0], prompt), cap)
            # A cache longer than the shared part must be cut back, which a rotating
            # (sliding-window) cache past its window cannot do.
            if m > n and (m == len(e[0]) or self.can_trim(e[1])):
                best, n = e, m
        tried = set()
        while self.disk is not None:
            # The best file on disk, if it beats memory; a bad one is deleted and the next
            # best tried.
            path, d = self.disk.best(prompt, cap, skip=tried)
            if path is None or d <= n:
                break
            tried.add(path)
            length = len(self.disk.entries[path])
            cache = self.disk.load(path)
            if cache is not None and length > d:
                # A file of a longer conversation: cut back to the shared part if the cache
                # can be (a rotating cache past its window cannot).
                cache = cache if self.can_trim(cache) and self.trim(cache, length - d) else None
            if cache is not None:
                best, n = self.put(list(prompt[:d]), cache), d
                break
        if best is None:
            return None, prompt, 0
        self.clock += 1
        best[3] = self.clock
        cache = copy.deepcopy(best[1])
        if len(best[0]) > n:
            self.trim(cache, len(best[0]) - n)
        self.hits += 1
        self.cached_tokens += n
        return cache, prompt[n:], n

    def put(self, tokens, cache, room=None):
        """Keeps a sequence's cache under its tokens; prefixes it extends go (a trimmable
        cache can stand in for them)."""
        if not tokens:
            return None
        trimmable = self.can_trim(cache)
        self.entries = [e for e in self.entries
                        if not (e[0] == tokens or (trimmable and len(e[0]) < len(tokens)
                                                   and tokens[:len(e[0])] == e[0]))]
        self.clock += 1
        entry = [list(tokens), cache, sum(c.nbytes for c in cache), self.clock]
        self.entries.append(entry)
        self.shrink(self.max_bytes if room is None else room)
        return entry

    def shrink(self, limit):
        """Drops least recently used prefixes until the rest fit in `limit` bytes; long ones
        are written to the disk tier first."""
        import mlx.core as mx
        dropped = False
        while self.entries and self.nbytes > limit:
            lru = min(self.entries, key=lambda e: e[3])
            self.entries.remove(lru)
            self.save(lru)
            dropped = True
        if dropped:
            mx.clear_cache()

    def save(self, entry):
        if self.disk is not None:
            t = self.disk.save(entry[0], entry[1])
            if t is not None:
                # Writers that finished are forgotten: only running ones are joined at exit.
                self.writes = [w for w in self.writes if w.is_alive()] + [t]

    def save_all(self):
        """At shutdown: every long prefix to disk, waiting for the writes."""
        for e in sorted(self.entries, key=lambda e: -len(e[0])):
            self.save(e)
        for t in self.writes:
            t.join()


def with_special_tokens(lark, specials):
    """A marker such as "<tool_call>" is one special token to llguidance, not its text; and a
    special token may only stand in a rule, not in a terminal (an upper-case name), so every
    terminal holding one, and every terminal using such a rule, becomes a rule."""
    for literal, token in specials.items():
        lark = lark.replace(literal, token)
    while True:
        bad = set()
        for name, body in re.findall(r"^([A-Z][A-Z0-9_]*)\s*:(.*)$", lark, flags=re.M):
            # Literals and regular expressions aside, does the body hold a token or a rule?
            body = re.sub(r'"(?:\\.|[^"\\])*"|/(?:\\.|[^/\\])*/', "", body)
            if "<[" in body or re.search(r"\b[a-z_][a-z0-9_]*\b", body):
                bad.add(name)
        if not bad:
            return lark
        for name in bad:
            lark = re.sub(rf"\b{name}\b", name.lower(), lark)


class Speculative:
    """One sequence decoded with a draft model (mlx-lm's speculative step: the draft proposes,
    the target verifies them in one pass, and the output is the target's own). It runs beside
    the batch, alone: while other sequences decode, batching them pays more. Its target KV
    starts from the prefix cache; the draft computes its own copy of the reused prefix."""

    def __init__(self, model, draft, prompt, cache, cached, max_tokens, sampler, processors,
                 num_draft):
        import mlx.core as mx
        from mlx_lm.generate import speculative_generate_step
        from mlx_lm.models.cache import make_prompt_cache
        self.model_cache = cache if cache is not None else make_prompt_cache(model)
        draft_cache = make_prompt_cache(draft)
        done = 0
        while done < cached:
            step = min(512, cached - done)
            draft(mx.array(prompt[done:done + step])[None], cache=draft_cache)
            mx.eval([c.state for c in draft_cache])
            done += step
        self.tokens = list(prompt)
        self.steps = speculative_generate_step(
            mx.array(prompt[cached:]), model, draft, num_draft_tokens=num_draft,
            max_tokens=max_tokens, sampler=sampler, logits_processors=processors or None,
            prompt_cache=self.model_cache + draft_cache)
        self.max_tokens, self.num_draft = max_tokens, num_draft

    def round(self):
        """One draft-and-verify round: [(token, logprobs)], accepted and proposed drafts, and
        whether the generator is exhausted (max_tokens)."""
        out, accepted = [], 0
        for token, logprobs, from_draft in self.steps:
            out.append((int(token), logprobs))
            self.tokens.append(int(token))
            if from_draft:
                accepted += 1
            else:
                return out, accepted, self.num_draft, False
        # Cut by max_tokens: fewer than `num_draft` were verified.
        return out, accepted, accepted, True

    def cache(self):
        """The target KV and the tokens it holds."""
        held = self.model_cache[0].offset
        return self.tokens[:held], self.model_cache

# Prompt lookup, as the GGUF path does it (src/engine/speculation.rs): the longest suffix of
# NGRAM_MAX down to NGRAM_MIN tokens found earlier in the last LOOKUP_WINDOW tokens proposes
# what followed it.
NGRAM_MAX, NGRAM_MIN, LOOKUP_WINDOW = 4, 2, 8192
# Below this acceptance rate a sequence stops proposing. Measured on the CPU build (Qwen 0.5B
# float32, OpenBLAS): a pass over 6 tokens costs 1.47x a one-token step, so five proposals pay
# once about half a token is accepted per round, a rate near 0.33.
LOOKUP_MIN_RATE = 0.35


def ngram_proposal(history, most):
    """Tokens that followed the most recent earlier occurrence of the history's last few
    tokens, at most `most`."""
    n = len(history)
    if most <= 0 or n < NGRAM_MIN + 1:
        return []
    start = max(0, n - LOOKUP_WINDOW)
    for size in range(min(NGRAM_MAX, n - 1), NGRAM_MIN - 1, -1):
        suffix = history[n - size:]
        for i in range(n - size - 1, start - 1, -1):
            if history[i:i + size] == suffix:
                return history[i + size:min(i + size + most, n)]
    return []


class Lookup:
    """One sequence decoded with prompt lookup: each round feeds the newest token and the
    tokens that followed the same few tokens earlier, keeps the proposals the model itself
    picks (each sampled from the model's own distribution, so the output is what plain
    decoding gives), plus the model's token where they part. Same interface as Speculative;
    it runs alone for the same reason. A sequence whose proposals keep missing stops
    proposing (a decayed acceptance rate, as on GGUF) and decodes one token a round."""

    def __init__(self, model, prompt, cache, cached, max_tokens, sampler, num_draft):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
        self.model, self.sampler, self.num_draft = model, sampler, num_draft
        self.trim = trim_prompt_cache
        self.model_cache = cache if cache is not None else make_prompt_cache(model)
        # The cache holds every token but the newest, which each round feeds first.
        if cached >= len(prompt):
            trim_prompt_cache(self.model_cache, cached - len(prompt) + 1)
            cached = len(prompt) - 1
        for done in range(cached, len(prompt) - 1, 512):
            chunk = prompt[done:min(done + 512, len(prompt) - 1)]
            model(mx.array(chunk)[None], cache=self.model_cache)
            mx.eval([c.state for c in self.model_cache])
        self.tokens = list(prompt)
        self.max_tokens, self.generated = max_tokens, 0
        self.accepted, self.rejected = 1.0, 1.0  # a prior of one hit and one miss

    def round(self):
        import mlx.core as mx
        left = self.max_tokens - self.generated
        rate = self.accepted / (self.accepted + self.rejected)
        proposal = (ngram_proposal(self.tokens, min(self.num_draft, left - 1))
                    if rate >= LOOKUP_MIN_RATE else [])
        logits = self.model(mx.array([self.tokens[-1]] + proposal)[None],
                            cache=self.model_cache)[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = self.sampler(logprobs)
        mx.eval(picked, logprobs)
        out, accepted = [], 0
        for i, token in enumerate(picked.tolist()):
            out.append((int(token), logprobs[i]))
            if i < len(proposal) and token == proposal[i]:
                accepted += 1
                continue
            break
        if proposal:
            missed = 0 if accepted == len(proposal) else 1
            self.accepted = 0.9 * self.accepted + accepted
            self.rejected = 0.9 * self.rejected + missed
        # The cache took every proposal; those after the first miss go.
        self.trim(self.model_cache, len(proposal) - accepted)
        self.tokens += [t for t, _ in out]
        self.generated += len(out)
        return out, accepted, len(proposal), self.generated >= self.max_tokens

    def cache(self):
        """The target KV and the tokens it holds."""
        held = self.model_cache[0].offset
        return self.tokens[:held], self.model_cache


class GrammarError(Exception):
    """A request's grammar that llguidance cannot compile: the client's error, not ours."""


class Guide:
    """A logits processor that keeps a sequence inside a grammar (llguidance). Lazy when it
    has triggers: free text until one matches the output, then the grammar from the match
    (its first group, if any) on, as llama.cpp's lazy grammars do."""

    def __init__(self, lltok, grammar, triggers, vocab):
        from llguidance import LLMatcher
        self.lltok, self.vocab = lltok, vocab
        self.grammar = grammar
        self.triggers = [re.compile(t) for t in triggers]
        self.matcher = None if self.triggers else LLMatcher(lltok, grammar)
        self.text = b""
        self.started = False

    def _advance(self, token):
        if self.matcher is not None:
            self.matcher.consume_token(token)
            return
        self.text += self.lltok.decode_bytes([token])
        s = self.text.decode("utf-8", errors="replace")
        for t in self.triggers:
            m = t.search(s)
            if m:
                start = m.start(1) if m.re.groups else m.start()
                from llguidance import LLMatcher
                self.matcher = LLMatcher(self.lltok, self.grammar)
                tail = s[start:].encode()
                self.matcher.consume_tokens(self.lltok.tokenize_bytes(tail))
                return

    def __call__(self, context, logits):
        import mlx.core as mx
        import numpy as np
        if self.started:
            self._advance(int(context[-1].item()))
        self.started = True
        if self.matcher is None or self.matcher.is_error():
            return logits
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little").astype(bool)
        width = logits.shape[-1]
        if bits.shape[0] < width:
            bits = np.concatenate([bits, np.zeros(width - bits.shape[0], dtype=bool)])
        return mx.where(mx.array(bits[:width]), logits, -mx.inf)


def main():
    model_path, parallel = sys.argv[1], int(sys.argv[2])
    settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
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
    draft = load(settings["draft"])[0] if settings.get("draft") else None
    num_draft = max(1, int(settings.get("num_draft", 4)))
    spec = {}  # request id -> Speculative
    spec_figures = {"proposed": 0, "accepted": 0, "steps": 0}
    eos = sorted(set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]))
    gen = BatchGenerator(model, stop_tokens=[[t] for t in eos],
                         completion_batch_size=parallel, prefill_batch_size=parallel)
    prefixes = Prefixes(int(settings.get("cache_bytes", 2 << 30)))
    inbox = queue.Queue()
    by_uid = {}
    lltok = []  # built on the first grammar (about a second for a 150k vocabulary)

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
                send({"type": "pong", "seq": msg["seq"],
                      "active": len(by_uid) + len(spec) + sum(map(len, waiting.values())),
                      "rss_bytes": rss_bytes(), "cache": prefixes.figures(),
                      "spec": spec_figures})
            else:
                inbox.put(msg)
        inbox.put({"type": "shutdown"})

    threading.Thread(target=read_stdin, daemon=True).start()
    send({"type": "ready", "version": VERSION, "pid": os.getpid(), "eos": eos})

    class Seq:
        def __init__(self, rid, cached, logprobs, prompt=()):
            self.rid, self.cached, self.logprobs = rid, cached, logprobs
            self.prompt = prompt
            self.prefilling = True
            self.generated = 0
            self.sent_first = False

    waiting = {}  # uid of a sequence still prefilling -> submits waiting for its KV
    # Requests the server paused for higher-priority ones: id -> (tokens, cache), their KV
    # kept whole (not in the bounded prefix cache) until they resume or are cancelled.
    parked = {}

    def pause(rid):
        """Takes a generating sequence out of the batch with its KV; None if it cannot be
        paused now (prefilling, waiting for a leader, or gone)."""
        if rid in spec:
            return spec.pop(rid).cache()
        for uid, s in list(by_uid.items()):
            if s.rid == rid and not s.prefilling:
                caches = gen.remove([uid], return_prompt_caches=True)
                del by_uid[uid]
                if uid not in caches:
                    return None
                cache, tokens = caches[uid]
                return list(tokens), cache
        return None

    def unpark(rid, prompt):
        """The parked KV of a resumed request, cut to what its new prompt (its prompt and
        what it generated) shares with it, with at least one token left to compute."""
        tokens, cache = parked.pop(rid)
        m = min(common_prefix(tokens, prompt), len(prompt) - 1)
        if m < len(tokens) and not (prefixes.can_trim(cache)
                                    and prefixes.trim(cache, len(tokens) - m)):
            return prefixes.fetch(prompt)
        return cache, prompt[m:], m

    def leader_for(prompt):
        """The prefilling sequence whose KV a new prompt should wait for, if any: the one
        sharing the most tokens, when that is at least MIN_SHARE and more than memory has."""
        best, n = None, 0
        for uid, s in by_uid.items():
            if s.prefilling:
                m = min(common_prefix(s.prompt, prompt), len(prompt) - 1)
                if m > n:
                    best, n = uid, m
        if best is None or n < MIN_SHARE or n <= prefixes.peek(prompt):
            return None
        return best

    def prefilled(uid):
        """A sequence's prompt is in its KV (or it left). A prompt that computed something
        worth sharing is kept with the finished prefixes now, not only when it ends, so a
        request arriving while it decodes starts from it too; what waited for it starts."""
        s = by_uid.get(uid)
        if s is not None and s.prefilling:
            s.prefilling = False
            if len(s.prompt) - s.cached >= MIN_SHARE:
                for cache, tokens in gen.extract_cache([uid]).values():
                    if tokens:
                        prefixes.put(list(tokens), cache,
                                     room=prefixes.max_bytes - gen.prompt_cache_nbytes)
        for msg in waiting.pop(uid, []):
            safely(msg)

    def logprobs_of(logprobs, token, k):
        lp = logprobs.astype(mx.float32).reshape(-1)
        top = []
        if k:
            idx = mx.argpartition(-lp, kth=k - 1)[:k]
            vals = lp[idx]
            top = sorted(zip(idx.tolist(), vals.tolist()), key=lambda t: -t[1])
        return [float(lp[token].item()), [[int(i), float(v)] for i, v in top]]

    def speculating(msg, guide, processors, cache):
        """How a request decodes: "draft" or "ngram" where asked for and possible (nothing
        else decoding, no grammar, whose state would follow rejected proposals, a cache that
        can be cut back; for prompt lookup no other logits processor either), else None. Draft
        speculation stops for this worker below 30% acceptance over 64 proposals."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
        mode = msg.get("speculate")
        if mode not in ("draft", "ngram") or guide is not None or by_uid or spec:
            return None
        if mode == "draft" and (draft is None or (
                spec_figures["proposed"] >= 64
                and spec_figures["accepted"] < 0.3 * spec_figures["proposed"])):
            return None
        if mode == "ngram" and processors:
            return None
        trimmable = can_trim_prompt_cache(cache if cache is not None else make_prompt_cache(model))
        return mode if trimmable else None

    def step_speculative(rid, sp):
        s = sp.seq
        tokens, accepted, proposed, exhausted = sp.round()
        if proposed:
            spec_figures["steps"] += 1
            spec_figures["proposed"] += proposed
            spec_figures["accepted"] += accepted
        step = {"tokens": [], "logprobs": []}
        reason = None
        for token, logprobs in tokens:
            s.generated += 1
            if token in eos:
                reason = "stop"
                break
            step["tokens"].append(token)
            if s.logprobs is not None:
                step["logprobs"].append(logprobs_of(logprobs, token, s.logprobs))
        if reason is None and (exhausted or s.generated >= sp.max_tokens):
            reason = "length"
        flush(send, s, step)
        if reason is not None:
            send({"type": "done", "id": rid, "reason": reason, "generated": s.generated})
            del spec[rid]
            held, cache = sp.cache()
            prefixes.put(held, cache)

    def guide_for(msg):
        if not msg.get("grammar"):
            return None
        try:
            from llguidance import LLMatcher
            from llguidance.gbnf_to_lark import any_to_lark
        except ImportError as e:
            raise RuntimeError("grammars on MLX need llguidance in the worker's Python "
                               "(pip install llguidance)") from e
        if not lltok:
            import llguidance.hf
            tok = llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=eos[0])
            specials = {json.dumps(t.content): f"<[{i}]>"
                        for i, t in tokenizer._tokenizer.added_tokens_decoder.items()
                        if tok.is_special_token(i)}
            lltok.extend([tok, specials])
        grammar = LLMatcher.grammar_from_lark(with_special_tokens(any_to_lark(msg["grammar"]),
                                                                 lltok[1]))
        error = LLMatcher.validate_grammar(grammar, lltok[0])
        if error and msg.get("triggers"):
            return None  # a lazy grammar is a safety net: unguarded, as on GGUF
        if error:
            raise GrammarError(error)
        return Guide(lltok[0], grammar, msg.get("triggers") or [], lltok[0].vocab_size)

    def handle(msg):
        kind = msg.get("type")
        if kind == "submit":
            prompt = msg["prompt"]
            resume = msg.get("resume") and msg["id"] in parked
            # Before any work on the request: a held one is handled again when released.
            leader = None if resume else leader_for(prompt)
            if leader is not None:
                waiting.setdefault(leader, []).append(msg)
                return True
            sampler = make_sampler(temp=msg.get("temperature", 0.0), top_p=msg.get("top_p", 0.0),
                                   min_p=msg.get("min_p", 0.0), top_k=msg.get("top_k", 0))
            bias = {int(k): v for k, v in (msg.get("logit_bias") or {}).items()}
            rp = msg.get("repeat_penalty")
            processors = make_logits_processors(
                logit_bias=bias or None,
                repetition_penalty=rp if rp and rp != 1.0 else None,
                presence_penalty=msg.get("presence_penalty") or None,
                frequency_penalty=msg.get("frequency_penalty") or None)
            guide = guide_for(msg)
            if guide is not None:
                processors = list(processors) + [guide]
            cache, rest, cached = unpark(msg["id"], prompt) if resume else prefixes.fetch(prompt)
            lp = msg.get("logprobs")
            mode = speculating(msg, guide, processors, cache)
            if mode == "draft":
                spec[msg["id"]] = Speculative(model, draft, prompt, cache, cached,
                                              msg["max_tokens"], sampler, processors, num_draft)
            elif mode == "ngram":
                spec[msg["id"]] = Lookup(model, prompt, cache, cached, msg["max_tokens"],
                                         sampler, num_draft)
            if mode is not None:
                spec[msg["id"]].seq = Seq(msg["id"], cached, None if lp is None else int(lp))
                return True
            [uid] = gen.insert([rest], max_tokens=[msg["max_tokens"]], caches=[cache],
                               all_tokens=[prompt[:cached]], samplers=[sampler],
                               logits_processors=[processors])
            by_uid[uid] = Seq(msg["id"], cached, None if lp is None else int(lp), prompt)
            # Running sequences' KV counts against the bound too.
            prefixes.shrink(prefixes.max_bytes - gen.prompt_cache_nbytes)
        elif kind == "pause":
            kept = pause(msg["id"])
            if kept is None:
                send({"type": "pause_refused", "id": msg["id"]})
            else:
                parked[msg["id"]] = kept
                send({"type": "paused", "id": msg["id"], "tokens": len(kept[0])})
        elif kind == "cancel":
            parked.pop(msg["id"], None)
            for held in waiting.values():
                held[:] = [m for m in held if m["id"] != msg["id"]]
            if msg["id"] in spec:
                tokens, cache = spec.pop(msg["id"]).cache()
                prefixes.put(tokens, cache)
            for uid, s in list(by_uid.items()):
                if s.rid == msg["id"]:
                    # What it computed stays reusable (a stop string or a client that left).
                    caches = gen.remove([uid], return_prompt_caches=True)
                    del by_uid[uid]
                    if uid in caches:
                        cache, tokens = caches[uid]
                        if tokens:
                            prefixes.put(list(tokens), cache)
                    prefilled(uid)
        elif kind == "disk":
            prefixes.disk = DiskTier(msg["dir"], bytes.fromhex(msg["key"]),
                                     int(msg.get("min_tokens", 256)),
                                     lambda: send({"type": "saved"}))
        elif kind == "trim_cache":
            prefixes.shrink(int(msg["bytes"]))
            send({"type": "trimmed", "seq": msg.get("seq"), "cache": prefixes.figures()})
        elif kind == "shutdown":
            prefixes.save_all()
            return False
        return True

    def safely(msg):
        """Handles one message; a bad one fails that request, not the worker."""
        try:
            return handle(msg)
        except GrammarError as e:
            send({"type": "error", "id": msg.get("id"), "param": "response_format",
                  "message": f"the grammar cannot be enforced: {e}"})
        except Exception as e:
            send({"type": "error", "id": msg.get("id"), "message": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
        return True

    while True:
        # Block for work when idle; otherwise take what arrived and step. Work that wakes an
        # idle worker waits a few milliseconds for more: clients that send together (six bots
        # on one trigger) then start in one batched prefill, not one alone and five after it.
        idle = not (by_uid or spec)
        try:
            if not safely(inbox.get(block=idle)):
                return
            while True:
                if not safely(inbox.get(timeout=COALESCE_S) if idle else inbox.get_nowait()):
                    return
        except queue.Empty:
            pass
        for rid, sp in list(spec.items()):
            step_speculative(rid, sp)
        if not by_uid:
            continue
        steps = {}
        # One step (a decode step and a prefill chunk), then the inbox again: a request that
        # arrives while another prefills joins that batch instead of waiting for it.
        prompt_steps, generated = gen.next()
        for r in prompt_steps:
            if r.end_of_prompt:
                prefilled(r.uid)
        for r in generated:
            s = by_uid.get(r.uid)
            if s is None:
                continue
            s.generated += 1
            step = steps.setdefault(r.uid, {"tokens": [], "logprobs": []})
            if not (r.finish_reason == "stop" and r.token in eos):
                step["tokens"].append(int(r.token))
                if s.logprobs is not None:
                    step["logprobs"].append(logprobs_of(r.logprobs, r.token, s.logprobs))
            if r.finish_reason is not None:
                flush(send, s, steps.pop(r.uid))
                send({"type": "done", "id": s.rid, "reason": r.finish_reason,
                      "generated": s.generated})
                del by_uid[r.uid]
                if r.prompt_cache is not None and r.all_tokens:
                    prefixes.put(list(r.all_tokens), r.prompt_cache,
                                 room=prefixes.max_bytes - gen.prompt_cache_nbytes)
                prefilled(r.uid)
        for uid, step in steps.items():
            flush(send, by_uid[uid], step)


def flush(send, s, step):
    """One step's tokens for a request; the first message also says what was reused."""
    if not step["tokens"] and s.sent_first:
        return
    msg = {"type": "tokens", "id": s.rid, "tokens": step["tokens"]}
    if s.logprobs is not None:
        msg["logprobs"] = step["logprobs"]
    if not s.sent_first:
        msg["cached"] = s.cached
        s.sent_first = True
    send(msg)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        traceback.print_exc()
        sys.exit(f"opta-lmx MLX worker failed: {e}")
    # Not through the interpreter's shutdown: the stdin reader thread may hold its lock.
    sys.stdout.flush()
    os._exit(0)
