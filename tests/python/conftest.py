"""Starts the real opta-lmx binary with the real Gemma model for the SDK tests."""

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "gemma-3-270m-q4_k_m"
QWEN = "qwen2.5-coder-0.5b-instruct-q4_k_m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(extra_args, model_id=MODEL, context="1024"):
    """Starts opta-lmx on a free port; yields its base URL, stops it afterwards."""
    binary = pathlib.Path(os.environ.get("OPTA_LMX_BIN", ROOT / "target/release/opta-lmx"))
    if model_id == MODEL:
        model = pathlib.Path(os.environ.get(
            "OPTA_LMX_TEST_MODEL", ROOT / "target/test-model/gemma-3-270m-q4_k_m.gguf"))
    else:
        model = ROOT / f"target/test-model/{model_id}.gguf"
    assert binary.exists(), f"build first: {binary} missing"
    assert model.exists(), f"run scripts/fetch-model.sh: {model} missing"
    models_dir = pathlib.Path(tempfile.mkdtemp(prefix="opta-lmx-py-"))
    (models_dir / f"{model_id}.gguf").symlink_to(model)
    config = models_dir / ".config.yaml"
    config.write_text("")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTA_LMX_")}
    log = open(models_dir / ".server.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "serve", "--config", str(config), "--port", str(port),
         "--models-dir", str(models_dir), "--model", model_id, "--context", context,
         "--audit-file", str(models_dir / ".audit.jsonl"),
         "--no-prompt-cache", *extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, (models_dir / ".server.log").read_text()
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.1)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(models_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    yield from _start(["--parallel", "4"])


@pytest.fixture(scope="module")
def busy_server():
    """One sequence and no wait queue: a second concurrent request is refused."""
    yield from _start(["--parallel", "1", "--max-queue", "0"])


@pytest.fixture(scope="module")
def qwen_server():
    """The instruction-tuned Qwen model, for chat and tool calls."""
    yield from _start(["--parallel", "2"], model_id=QWEN, context="4096")
