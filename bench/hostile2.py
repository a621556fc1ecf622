"""The second hardening round's findings (rows R1-R8), run by bench/hostile.py --round 2.

Each scenario starts its own server so that the binary before the fixes and the one after
can be compared row by row. Standard library only: HTTP/2 frames and a Hub that speaks the
Hugging Face protocol are written out by hand here. R5 mounts a small tmpfs inside a private
mount namespace (`unshare -rm`), so the disk can be filled without touching the machine's.
"""
import hashlib
import http.client
import json
import os
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hostile import MODEL, HealthWatch, Server, free_port, line, short


def rss_mb(srv):
    with open(f"/proc/{srv.proc.pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    return 0.0


def raw_request(port, head, timeout=10):
    """Sends raw request bytes on a fresh socket; gives the status line (or what went wrong)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(head)
        data = s.recv(200)
        return data.split(b"\r\n")[0].decode(errors="replace") or "closed"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()


# R1: client-chosen methods as metric labels and log lines.
def method_labels(binary, model_file):
    srv = Server(binary, model_file, env={"OPTA_LMX_METRICS_OPEN": "true"})
    try:
        size0 = len(srv.get("/metrics")[1])
        rss0 = rss_mb(srv)
        t = time.time()
        n = 500
        for i in range(n):
            method = f"M{i:07d}" + "Y" * 10_000
            raw_request(srv.port, f"{method} /nope HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        took = time.time() - t
        size1 = len(srv.get("/metrics")[1])
        line("R1", f"{n} 10 KB methods on /nope", f"/metrics {size0} -> {size1} B", took,
             f"RSS {rss0:.0f} -> {rss_mb(srv):.0f} MB, log {os.path.getsize(srv.dir + '/log')} B")
    finally:
        srv.stop()


# R2: HTTP/2 connections whose receive window is zero.
def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def h2_zero_window(port, path):
    """An h2c connection (prior knowledge) that announces a zero window and asks for `path`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    s.sendall(h2_frame(0x4, 0, 0, struct.pack(">HI", 0x4, 0)))  # INITIAL_WINDOW_SIZE = 0
    block = (b"\x82\x86" + b"\x44" + bytes([len(path)]) + path.encode()
             + b"\x41\x09127.0.0.1")  # GET, http, :path, :authority (HPACK literals)
    s.sendall(h2_frame(0x1, 0x5, 1, block))  # HEADERS, END_STREAM | END_HEADERS
    return s


def closed_by_server(s, wait):
    """Reads (and ignores) frames until the server closes the socket or `wait` runs out."""
    s.settimeout(0.5)
    end = time.time() + wait
    while time.time() < end:
        try:
            if s.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def h2_windows(binary, model_file):
    cap = 16
    srv = Server(binary, model_file, env={"OPTA_LMX_MAX_CONNECTIONS": str(cap)})
    held = []
    try:
        for _ in range(cap):
            held.append(h2_zero_window(srv.port, "/openapi.json"))
        time.sleep(1.0)
        status, text, took, _ = srv.get("/healthz", timeout=10)
        line("R2", f"/healthz beside {cap} zero-window h2 conns (cap {cap})",
             f"{status} {short(text, 20)}", took)
        t = time.time()
        gone = [closed_by_server(s, 45 - (time.time() - t)) for s in held]
        line("R2", "  zero-window conns closed by the server", f"{sum(gone)} of {cap}",
             time.time() - t)
    finally:
        for s in held:
            s.close()
        srv.stop()


# R3: a grammar bomb beside a normal request.
def short_request(srv):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    status, _, took, _ = srv.post("/v1/completions", body, timeout=120)
    return status, took


def grammar_bomb(binary, model_file):
    for size in (20_000, 5_000):
        srv = Server(binary, model_file)
        try:
            bomb_beside(srv, size)
        finally:
            srv.stop()


def bomb_beside(srv, size):
    short_request(srv)
    alone = [short_request(srv)[1] for _ in range(3)]
    enum = [f"value-{i:06d}-{'x' * (i % 7)}" for i in range(size)]
    bomb = {"model": MODEL, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Pick one."}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "pick", "schema": {"type": "object", "properties": {
                    "v": {"type": "string", "enum": enum}}, "required": ["v"]}}}}
    results = {}

    def run_bomb(i):
        results[i] = srv.post("/v1/chat/completions", bomb, timeout=120)

    health = HealthWatch(srv)
    bombs = [threading.Thread(target=run_bomb, args=(i,)) for i in range(2)]
    for t in bombs:
        t.start()
    time.sleep(1.0)
    beside = []
    while any(t.is_alive() for t in bombs) and len(beside) < 30:
        beside.append(short_request(srv))
    for t in bombs:
        t.join()
    status, text, took, _ = results[0]
    line("R3", f"2 x json_schema enum of {size:,} strings", f"{status} {short(text, 24)}", took)
    ok = [b for s, b in beside if s == 200]
    line("R3", "  8-token request alone / beside them",
         f"{statistics.median(alone):.2f} s / "
         + (f"{max(ok):.2f} s worst of {len(ok)}" if ok else str([s for s, _ in beside])), 0)
    line("R3", "  slowest /healthz meanwhile", "", health.stop())
    after = short_request(srv)
    line("R3", "  8-token request once they ended", after[0], after[1])


# R4: LM Studio's load and unload with only the inference key.
def lmstudio_admin(binary, model_file):
    srv = Server(binary, model_file,
                 env={"OPTA_LMX_API_KEY": "sk-api", "OPTA_LMX_ADMIN_KEY": "sk-admin"})
    try:
        api = {"authorization": "Bearer sk-api"}
        status, text, took, _ = srv.post("/admin/models/unload", {"model_id": MODEL},
                                         headers=api)
        line("R4", "/admin/models/unload with the API key", f"{status} {short(text, 20)}", took)
        status, text, took, _ = srv.post("/api/v1/models/unload", {"instance_id": MODEL},
                                         headers=api)
        line("R4", "/api/v1/models/unload with the API key", f"{status} {short(text, 20)}",
             took)
        status, text, took, _ = srv.post("/api/v1/models/load",
                                         {"model": MODEL, "context_length": 1},
                                         headers={"authorization": "Bearer sk-admin"},
                                         timeout=120)
        line("R4", "/api/v1/models/load context_length 1 (admin)",
             f"{status} {short(text, 20)}", took)
        status, _, took, _ = srv.get("/v1/models", timeout=10)
        status, _, _, _ = srv.request("GET", "/v1/models",
                                      headers={"authorization": "bearer sk-api"})
        line("R4", "/v1/models with 'bearer' (lower-case scheme)", status, 0)
    finally:
        srv.stop()


# A Hub that speaks the protocol the server's client uses, for R5, R7 and R8.
class FakeHub:
    def __init__(self, repos, rate=None, link=None, port=0):
        """`repos`: {repo: {path: bytes}}; `rate`: bytes/s per transfer; `link`: a URL the
        file list's first page names as its next page."""
        self.repos, self.rate, self.link, self.seen = repos, rate, link, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, code, body, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.seen.append((self.path, self.headers.get("authorization")))
                path = self.path.split("?")[0]
                for repo, files in hub.repos.items():
                    sha = hashlib.sha1(repo.encode()).hexdigest()
                    if path.startswith(f"/api/models/{repo}/revision/"):
                        return self.send(200, json.dumps({"sha": sha}).encode())
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        listing = [{"type": "file", "path": p, "size": len(d),
                                    "oid": hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest(),
                                    "lfs": {"oid": hashlib.sha256(d).hexdigest(),
                                            "size": len(d)}}
                                   for p, d in files.items()]
                        extra = [("link", f'<{hub.link}>; rel="next"')] if hub.link else []
                        return self.send(200, json.dumps(listing).encode(), extra)
                    prefix = f"/{repo}/resolve/{sha}/"
                    if path.startswith(prefix) and path[len(prefix):] in files:
                        return self.file(files[path[len(prefix):]])
                self.send(404, b"{}", [("x-error-code", "RepoNotFound")])

            def file(self, data):
                start = 0
                rng = self.headers.get("range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("content-range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("content-length", str(len(data) - start))
                self.end_headers()
                step = 1 << 16
                for at in range(start, len(data), step):
                    try:
                        self.wfile.write(data[at:at + step])
                    except OSError:
                        return
                    if hub.rate:
                        time.sleep(step / hub.rate)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def wait_job(srv, job, wait=60):
    end = time.time() + wait
    while time.time() < end:
        status, text, _, _ = srv.get(f"/admin/model/download/{job}", timeout=10)
        state = json.loads(text).get("state") if status == 200 else f"HTTP {status}"
        if state != "downloading":
            return state, text
        time.sleep(0.2)
    return "still downloading", ""


def server_path(srv, path):
    """A path as the server sees it (its mount namespace, for the tmpfs of R5)."""
    return f"/proc/{srv.proc.pid}/root{path}"


def small_disk_server(binary, model_file, hub, mb=260):
    """A server whose models folder is an `mb` MB tmpfs in a mount namespace of its own."""
    mnt = tempfile.mkdtemp(prefix="hostile-disk-")
    wrap = ["unshare", "-rm", "sh", "-c",
            f'mount -t tmpfs -o size={mb}m tmpfs "{mnt}" && exec "$@"', "sh"]
    srv = Server(binary, model_file, load=False, wrap=wrap, models=mnt,
                 env={"HF_ENDPOINT": hub.url})
    return srv, mnt


def record(srv, mnt, job):
    """The state a job's record on the server's disk says (or why it cannot be read)."""
    try:
        with open(server_path(srv, f"{mnt}/.downloads/{job}/job.json")) as f:
            return json.load(f).get("state")
    except (OSError, ValueError) as e:
        return type(e).__name__


def leftover(srv, mnt, job):
    tmp = server_path(srv, f"{mnt}/.downloads/{job}/job.json.tmp")
    return "job.json.tmp left" if os.path.exists(tmp) else "no job.json.tmp"


# R5: two downloads against a disk that holds one.
def downloads_disk(binary, model_file):
    data = os.urandom(150 << 20)
    hub = FakeHub({"org/a": {"a.gguf": data}, "org/b": {"b.gguf": data}}, rate=40 << 20)
    srv, mnt = small_disk_server(binary, model_file, hub)
    try:
        answers = []
        for repo in ("org/a", "org/b"):
            status, text, _, _ = srv.post("/admin/model/download",
                                          {"model_id": repo, "files": [repo[-1] + ".gguf"]})
            answers.append((status, json.loads(text)))
        line("R5", "two 150 MB downloads, 260 MB disk",
             " / ".join(str(s) for s, _ in answers), 0,
             short(json.dumps(answers[1][1]), 60))
        for status, body in answers:
            if status == 202:
                job = body.get("job_id")
                state, _ = wait_job(srv, job)
                line("R5", f"  job {job}", f"{state}; job.json says {record(srv, mnt, job)}", 0,
                     leftover(srv, mnt, job))
    finally:
        srv.stop()
        hub.stop()


# R5: a disk that fills up under a running download (another program writes to it).
def download_disk_full(binary, model_file):
    data = os.urandom(150 << 20)
    hub = FakeHub({"org/a": {"a.gguf": data}}, rate=20 << 20)
    srv, mnt = small_disk_server(binary, model_file, hub)
    try:
        status, text, _, _ = srv.post("/admin/model/download",
                                      {"model_id": "org/a", "files": ["a.gguf"]})
        job = json.loads(text).get("job_id")
        time.sleep(1.0)
        filler = server_path(srv, f"{mnt}/filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * (1 << 20))
        except OSError:
            pass
        finally:
            os.close(fd)
        state, _ = wait_job(srv, job)
        line("R5", "disk filled by another program mid-download", state, 0,
             f"job.json says {record(srv, mnt, job)}; {leftover(srv, mnt, job)}")
    finally:
        srv.stop()
        hub.stop()


# R6: unknown model names against a big models directory.
def unknown_names(binary, model_file):
    srv = Server(binary, model_file)
    try:
        for i in range(1000):
            d = os.path.join(srv.dir, f"org{i}", "repo")
            os.makedirs(d)
            for j in range(5):
                open(os.path.join(d, f"f{j}.txt"), "w").close()
        counts, stop = [0] * 8, time.time() + 5
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}

        def client(i):
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            while time.time() < stop:
                c.request("POST", "/v1/chat/completions", json.dumps(body),
                          {"content-type": "application/json"})
                c.getresponse().read()
                counts[i] += 1
            c.close()

        lat = []

        def health():
            while time.time() < stop:
                lat.append(srv.get("/healthz", timeout=30)[2])
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        threads.append(threading.Thread(target=health))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        line("R6", "8 clients, unknown names, 1,000 folders", f"{sum(counts) / 5:.0f} req/s", 5,
             f"/healthz p50 {statistics.median(lat) * 1000:.0f} ms")
    finally:
        srv.stop()


# R7: the Hub token and a Link header that points elsewhere: a host whose address begins with
# the Hub's (as huggingface.co.evil begins with huggingface.co), here a port that does.
def prefix_ports():
    """A Hub and an "evil" server whose port's digits begin with the Hub's port's."""
    for hub_port in range(2100, 6500, 37):
        for evil_port in (hub_port * 10 + 7, hub_port * 10 + 3):
            try:
                evil = FakeHub({}, port=evil_port)
            except OSError:
                continue
            try:
                return FakeHub({}, port=hub_port), evil
            except OSError:
                evil.stop()
    raise SystemExit("no free pair of ports")


def hub_link(binary, model_file):
    hub, evil = prefix_ports()
    hub.repos = {"org/r": {"r.gguf": b"GGUF" + os.urandom(1000)}}
    hub.link = evil.url + "/api/models/org/r/tree/x?cursor=2"
    srv = Server(binary, model_file, load=False,
                 env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_token"})
    try:
        status, text, took, _ = srv.post("/admin/model/download", {"model_id": "org/r"})
        leaked = [a for _, a in evil.seen if a and "hf_secret_token" in a]
        line("R7", f"Link: <{evil.url[7:]}/...> after hub {hub.url[7:]}",
             f"{status} {short(text, 20)}", took,
             f"token sent to the other host {len(leaked)} time(s)")
    finally:
        srv.stop()
        hub.stop()
        evil.stop()


# R8: a repository whose file names meet the staging names.
def staging_names(binary, model_file):
    hub = FakeHub({"org/s": {"x.gguf.part": os.urandom(3000),
                             "x.gguf": b"GGUF" + os.urandom(5000)}})
    srv = Server(binary, model_file, load=False, env={"HF_ENDPOINT": hub.url})
    try:
        status, text, _, _ = srv.post("/admin/model/download",
                                      {"model_id": "org/s", "files": ["x.gguf.part", "x.gguf"]})
        job = json.loads(text).get("job_id") or json.loads(text).get("download_id")
        state, body = wait_job(srv, job) if status == 202 else (status, text)
        err = json.loads(body).get("error") if body.startswith("{") else body
        line("R8", "repo with x.gguf and x.gguf.part", state, 0, short(str(err), 60))
    finally:
        srv.stop()
        hub.stop()


SCENARIOS = (method_labels, h2_windows, grammar_bomb, lmstudio_admin, downloads_disk,
             download_disk_full, unknown_names, hub_link, staging_names)

if __name__ == "__main__":
    raise SystemExit("run bench/hostile.py --round 2")
