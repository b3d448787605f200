"""Auth key store and the HTTP middleware, without Ray (Starlette's test client)."""

from __future__ import annotations

import os
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from deployments import http
from deployments.auth import KeyStore
from deployments.config import AuthArgs


def test_env_keys(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "k1, k2\nk3")
    ks = KeyStore(AuthArgs(api_keys_env="TEST_KEYS"))
    assert ks.enabled
    assert ks.check("Bearer k2") and ks.check("bearer k3") and not ks.check("Bearer k4")
    assert not ks.check(None) and not ks.check("Basic k1") and not ks.check("k1")


def test_no_keys_accepts_anything(monkeypatch):
    monkeypatch.delenv("TEST_KEYS", raising=False)
    ks = KeyStore(AuthArgs(api_keys_env="TEST_KEYS"))
    assert not ks.enabled
    for h in (None, "Bearer NO_API_KEY_PROVIDED", "Bearer **********", "garbage"):
        assert ks.check(h)


def test_file_keys_reload_and_fail_closed(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nfile-key\n")
    ks = KeyStore(AuthArgs(api_keys_env=None, api_keys_file=str(f), reload_s=0.01))
    assert ks.check("Bearer file-key") and not ks.check("Bearer other")
    time.sleep(0.05)
    f.write_text("rotated\n")
    os.utime(f, (time.time() + 5, time.time() + 5))
    time.sleep(0.05)
    assert ks.check("Bearer rotated") and not ks.check("Bearer file-key")
    f.unlink()
    time.sleep(0.05)
    assert ks.enabled and not ks.check("Bearer rotated") and not ks.check(None)  # fail closed


def test_missing_file_at_start_fails_closed(tmp_path):
    ks = KeyStore(AuthArgs(api_keys_env=None, api_keys_file=str(tmp_path / "absent")))
    assert ks.enabled and not ks.check("Bearer anything") and not ks.check(None)


@pytest.fixture
def client():
    async def echo(request: Request):
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    wrapped = http.BodyLimitMiddleware(http.DynamicCORSMiddleware(app))
    saved = dict(http.SETTINGS)
    http.configure(max_body_bytes=1000, cors_allow_origins=[], log_requests=False)
    yield TestClient(wrapped)
    http.SETTINGS.clear()
    http.SETTINGS.update(saved)


def test_body_limit_by_content_length(client):
    assert client.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}
    r = client.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_body_limit_when_streamed_without_length(client):
    def chunks():
        for _ in range(30):
            yield b"y" * 100

    r = client.post("/echo", content=chunks())
    assert r.status_code == 413


def test_cors_off_by_default_and_configurable(client):
    r = client.options("/echo", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    http.configure(max_body_bytes=1000, cors_allow_origins=["https://app.example"], log_requests=False)
    r = client.options("/echo", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") == "https://app.example"
    r = client.options("/echo", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
