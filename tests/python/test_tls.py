"""HTTPS through the official openai SDK: a certificate from a private CA (made by trustme),
trusted by the client through an httpx client, as a household CA would be."""

import os
import pathlib
import shutil
import ssl
import subprocess
import tempfile
import time

try:  # the openai SDK's HTTP client: httpx2 in current releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx
import openai
import pytest
import trustme

from conftest import MODEL, ROOT, _free_port


@pytest.fixture(scope="module")
def https_server():
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="opta-lmx-tls-"))
    cert_pem, key_pem, ca_pem = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_pem, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    (tmp / f"{MODEL}.gguf").symlink_to(ROOT / f"target/test-model/{MODEL}.gguf")
    (tmp / "c.yaml").write_text("")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTA_LMX_")}
    proc = subprocess.Popen(
        [str(ROOT / "target/release/opta-lmx"), "serve", "--config", str(tmp / "c.yaml"),
         "--port", str(port), "--models-dir", str(tmp), "--model", MODEL, "--context", "512",
         "--audit-file", str(tmp / ".audit.jsonl"), "--no-prompt-cache",
         "--tls-cert", str(cert_pem), "--tls-key", str(key_pem)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"https://localhost:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(base + "/readyz", verify=ssl.create_default_context(cafile=str(ca_pem)), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "HTTPS server did not start"
        time.sleep(0.1)
    yield base, ca_pem
    proc.terminate()
    proc.wait(timeout=15)
    shutil.rmtree(tmp, ignore_errors=True)


def test_openai_sdk_over_https_with_the_ca(https_server):
    base, ca_pem = https_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused",
                           http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(ca_pem))))
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, max_tokens=5,
                                       messages=[{"role": "user", "content": "Hello"}])
    assert r.usage.completion_tokens == 5
    assert r.choices[0].message.content
    # Streaming works over TLS too (HTTP/1.1 here; h2 is offered by ALPN as well).
    stream = client.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) >= 1


def test_a_client_without_the_ca_is_refused(https_server):
    base, _ = https_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIConnectionError) as e:
        client.models.list()
    assert isinstance(e.value.__cause__, (ssl.SSLError, httpx.ConnectError))
