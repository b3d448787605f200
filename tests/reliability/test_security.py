"""Security: constant-time key checks, every inference route guarded, no keys / text / images in logs, error
bodies or metrics labels, body limits before parsing, CORS off by default and configurable."""

from __future__ import annotations

import base64
import glob
import io
import os
import socket
import time
import urllib.request
import uuid
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.protocol import ErrorResponse

from .conftest import TEXT, VL


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key goes through hmac.compare_digest, whether the first one matches or none does."""
    import hmac

    from deployments import auth
    from deployments.config import AuthArgs

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    monkeypatch.setenv("REL_KEYS", "key-one,key-two-longer,key-3")
    store = auth.KeyStore(AuthArgs(api_keys_env="REL_KEYS"))
    for header, ok in (("Bearer key-one", True), ("Bearer key-3", True), ("Bearer nope", False),
                       ("Bearer key-on", False), ("Bearer " + "k" * 5000, False)):
        calls.clear()
        assert store.check(header) is ok
        assert len(calls) == 3, "a key was skipped: the time taken would tell which key matched"


def _body_for(path: str) -> dict:
    if "ranking" in path:
        return {"query": {"text": "q"}, "passages": [{"text": "a"}]}
    if "score" in path:
        return {"text_1": "q", "text_2": ["a"]}
    return {"query": "q", "documents": ["a"]}


def test_every_inference_route_is_guarded(service):
    """Whatever routes the OpenAPI document lists: each POST needs the key, health and model listing stay open."""
    spec = service.client.get("/openapi.json").json()
    posts = [p for p, ops in spec["paths"].items() if "post" in ops]
    gets = [p.replace("{model_id}", TEXT) for p, ops in spec["paths"].items() if "get" in ops]
    assert len(posts) >= 6
    key = "sk-guard-" + uuid.uuid4().hex
    service.set_keys([key])
    try:
        for path in posts:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                            {"Authorization": f"Basic {key}"}):
                r = service.client.post(path, json=_body_for(path), headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers, r.text)
            r = service.client.post(path, json=_body_for(path), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (path, r.text)
        for path in gets:
            assert service.client.get(path).status_code == 200, path
    finally:
        service.set_keys([])


def _noise_png_b64(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _session_logs() -> list[str]:
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    return [p for p in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True) if os.path.isfile(p)]


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def test_no_keys_text_or_images_in_logs_errors_or_metrics(service, ray_cluster):
    tag = uuid.uuid4().hex[:12]  # names this test's requests (x-request-id); echoing that is fine
    key, wrong_key = f"sk-live-{uuid.uuid4().hex}", f"sk-wrong-{uuid.uuid4().hex}"
    doc_marker, query_marker = uuid.uuid4().hex, uuid.uuid4().hex
    doc_text = f"confidential passage {doc_marker} about a patient"
    query_text = f"private query {query_marker}"
    image = _noise_png_b64(int(tag[:6], 16))
    image_marker = image[len(image) // 2 : len(image) // 2 + 48]  # a stretch of the image's base64
    secrets = {"key": key, "wrong key": wrong_key, "document": doc_marker, "query": query_marker,
               "image": image_marker}
    service.set_keys([key])
    errors: list[httpx.Response] = []
    try:
        auth = {"Authorization": f"Bearer {key}", "x-request-id": f"sec-{tag}"}
        ok = [
            service.client.post("/v1/rerank", json={"model": TEXT, "query": query_text, "documents": [doc_text]},
                                headers=auth),
            service.client.post("/v1/ranking", json={"model": VL, "query": {"text": query_text},
                                                     "passages": [{"text": doc_text, "image": image}]}, headers=auth),
        ]
        assert all(r.status_code == 200 for r in ok), [r.text for r in ok]
        errors += [
            service.client.post("/v1/rerank", json={"query": query_text, "documents": [doc_text]},
                                headers={"Authorization": f"Bearer {wrong_key}"}),
            service.client.post("/v1/ranking", json={"query": {"text": query_text}, "truncate": "NONE",
                                                     "passages": [{"text": (doc_text + " ") * 2000}]}, headers=auth),
            service.client.post("/v1/rerank", json={"model": TEXT, "query": query_text,
                                                    "documents": [{"text": doc_text, "image": image}]}, headers=auth),
            service.client.post("/v1/rerank", json={"model": VL, "query": query_text,
                                                    "documents": [{"image": image[: len(image) // 2]}]},
                                headers=auth),
            service.client.post("/v1/rerank", json={"query": query_text, "documents": [doc_text] * 1001},
                                headers=auth),
        ]
    finally:
        service.set_keys([])
    assert [r.status_code for r in errors] == [401, 400, 400, 400, 400], [r.text for r in errors]
    for r in errors:
        ErrorResponse.model_validate(r.json())
        for what, secret in secrets.items():
            assert secret not in r.text, f"the {what} is in an error body: {r.text}"
            assert not any(secret in v for v in r.headers.values()), f"the {what} is in a response header"

    # logs: every file Ray wrote for this session (serve replica logs, worker stdout/stderr, raylet, GCS, ...)
    deadline = time.monotonic() + 30
    seen_request = False
    while not seen_request and time.monotonic() < deadline:  # the request's access-log line proves the flush
        seen_request = any(f"sec-{tag}" in _read(p) for p in _session_logs())
        time.sleep(1)
    assert seen_request, "the request's access-log line never appeared"
    for path in _session_logs():
        content = _read(path)
        for what, secret in secrets.items():
            assert secret not in content, f"the {what} is in {path}"

    # metrics: neither the names nor any label value carry request content or keys
    def scrape() -> str:
        url = f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=30).read().decode()

    deadline = time.monotonic() + 60
    text = scrape()
    while "ray_rerank_requests_total" not in text and time.monotonic() < deadline:  # exported every few seconds
        time.sleep(2)
        text = scrape()
    assert "ray_rerank_requests_total" in text
    for what, secret in secrets.items():
        assert secret not in text, f"the {what} is in /metrics"


def test_cors_is_off_by_default(service):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = service.client.options("/v1/rerank", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = service.client.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                            headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_when_configured(aux):
    url = aux.url("rel-faults", "/v1/rerank")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(url, headers={"Origin": "https://app.example", **preflight}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(url, headers={"Origin": "https://evil.example", **preflight}, timeout=60)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    r = httpx.post(url, json={"query": "q", "documents": ["a"]}, headers={"Origin": "https://app.example"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_body_limit_applies_before_parsing(aux):
    """rel-faults takes bodies up to 64 KiB: a declared or streamed body over it is a 413, read no further."""
    url = aux.url("rel-faults", "/v1/rerank")
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(f"POST {u.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 70000\r\n\r\n".encode())  # the body is never sent
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 413")

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"query": "q", "documents": ["'
        for _ in range(200):
            yield b"x" * 1000
        yield b'"]}'

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and ErrorResponse.model_validate(r.json()).type == "request_too_large"
    r = httpx.post(url, json={"query": "q", "documents": ["x" * 60_000]}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/health/ready", "/v1/models"])
def test_open_routes_reveal_no_configuration_secrets(service, path):
    r = service.client.get(path)
    assert r.status_code == 200
    for private in (*service.sources.values(), str(service.keys_file), "api_keys"):
        assert private not in r.text  # checkpoint paths, the keys file, auth settings
