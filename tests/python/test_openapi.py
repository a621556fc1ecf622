"""The OpenAPI document: valid OpenAPI 3.1, and in step with the router both ways. The router
and the document are both made from the route table in src/api/routes.rs: each row's declared
method must be the method its handler is routed under, every row is documented, and every
documented operation is answered (by its handler, not the 404/405 fallbacks)."""

import json
import pathlib
import re
import urllib.request

try:  # the openai SDK's HTTP client: httpx2 in current releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx
from openapi_spec_validator import validate

ROOT = pathlib.Path(__file__).resolve().parents[2]


def routes_in_router():
    """(method, path) of every row of the route table, checking that the method a row declares
    (which the document shows) is the one its handler is routed under (which the router
    serves)."""
    src = (ROOT / "src/api/routes.rs").read_text()
    found = set()
    rows = re.finditer(
        r'op\(\s*"(get|post|delete|put)",\s*"([^"]+)".*?\|\|\s*\{?\s*(get|post|delete|put)\(', src, re.S
    )
    for m in rows:
        declared, path, routed = m.groups()
        assert declared == routed, f"{path}: documented as {declared}, routed as {routed}"
        found.add((declared, path.replace("{*", "{")))
    return found


def test_document_is_valid_openapi_31_and_covers_every_route(server):
    with urllib.request.urlopen(server + "/openapi.json") as r:
        assert r.headers["content-type"].startswith("application/json")
        doc = json.load(r)
    assert doc["openapi"].startswith("3.1")
    validate(doc)
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    routes = routes_in_router()
    assert len(routes) > 40
    assert routes - documented == set(), "routes missing from the document"
    assert documented - routes == set(), "documented operations the router does not serve"
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"model", "messages", "tools"} <= set(props)


def test_every_documented_operation_reaches_its_handler(server):
    with urllib.request.urlopen(server + "/openapi.json") as r:
        doc = json.load(r)
    with httpx.Client(base_url=server, timeout=30) as c:
        for path, item in doc["paths"].items():
            # Parameters get values no handler knows, so nothing is changed or deleted.
            url = re.sub(r"\{[^}]+\}", "no-such-thing", path)
            for method in item:
                if path.endswith("/progress"):
                    continue  # an unknown job's progress is a 404 from the handler, checked below
                if path == "/admin/events":
                    # An event stream never ends: its head is enough.
                    with c.stream("GET", url) as r:
                        assert r.status_code == 200, (method, path)
                        assert r.headers["content-type"].startswith("text/event-stream")
                    continue
                r = c.request(method.upper(), url, json={} if method != "get" else None)
                body = r.text
                assert r.status_code != 405, (method, path, body)
                assert "no route for" not in body, (method, path, body)
        r = c.get("/admin/models/download/no-such-thing/progress")
        assert r.status_code == 404 and "no route for" not in r.text


def test_docs_page_renders_the_document(server):
    r = httpx.get(server + "/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in r.text
    assert "<script src" not in r.text and "cdn" not in r.text.lower()
