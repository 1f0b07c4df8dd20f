"""Swagger UI at /docs works offline: no CDN URL in the page, every asset served by the app itself."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.routing import Mount

from dtrain.serving.docs import serve_docs_offline


class PaintRequest(BaseModel):
    zebra_count: int = Field(3, description="How many zebras to paint")


def tiny_app() -> FastAPI:
    # docExpansion=full: the operation (and its example body) renders expanded, so the DOM shows the field
    app = FastAPI(title="tiny", docs_url=None, redoc_url=None, swagger_ui_parameters={"docExpansion": "full"})

    @app.post("/v1/paint")
    def paint(req: PaintRequest) -> dict:
        return {"zebras": req.zebra_count}

    serve_docs_offline(app)
    return app


@pytest.mark.parametrize("root_path", ["", "/prefix"])
def test_docs_page_is_served_by_the_app(root_path):
    # like Ray Serve behind a route prefix: root_path set and the request path carries the prefix
    client = TestClient(tiny_app(), root_path=root_path)
    page = client.get(f"{root_path}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.search(r"https?://|//cdn", html), "the page must not load anything from the internet"

    assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', html)
    assert len(assets) == 3  # swagger-ui-bundle.js, swagger-ui.css, favicon
    for url in assets:
        assert url.startswith(f"{root_path}/docs-assets/"), url
        got = client.get(url)
        assert got.status_code == 200, url
        assert len(got.content) > 1000, url
    js = next(u for u in assets if u.endswith(".js"))
    assert b"SwaggerUIBundle" in client.get(js).content

    openapi_url = re.search(r"url: '([^']+)'", html).group(1)
    assert openapi_url == f"{root_path}/openapi.json"
    schema = client.get(openapi_url).json()
    assert "/v1/paint" in schema["paths"]
    field = schema["components"]["schemas"]["PaintRequest"]["properties"]["zebra_count"]
    assert field["description"] == "How many zebras to paint"

    redirect = re.search(r"oauth2RedirectUrl: window\.location\.origin \+ '([^']+)'", html).group(1)
    assert redirect == f"{root_path}/docs/oauth2-redirect"
    assert client.get(redirect).status_code == 200


def test_docs_stay_out_of_the_schema():
    schema = TestClient(tiny_app()).get("/openapi.json").json()
    assert list(schema["paths"]) == ["/v1/paint"]


def test_needs_an_openapi_url():
    with pytest.raises(ValueError, match="openapi_url"):
        serve_docs_offline(FastAPI(openapi_url=None, docs_url=None, redoc_url=None))


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no headless browser (chromium / chromium-browser) on PATH; "
                                            "Debian: apt-get install -y --no-install-recommends chromium")
def test_swagger_ui_renders_in_a_real_browser(tmp_path):
    import uvicorn

    # Mount under /e2e: the prefix arrives as scope["root_path"], as a Ray Serve route prefix does
    outer = Starlette(routes=[Mount("/e2e", app=tiny_app())])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(outer, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        browser = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--dump-dom", "--virtual-time-budget=5000", f"http://127.0.0.1:{port}/e2e/docs"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            dom, _ = browser.communicate(timeout=60)
        finally:
            if browser.poll() is None:
                os.killpg(browser.pid, signal.SIGKILL)  # chromium and its helper processes
                browser.wait()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert "Unable to render" not in dom
    assert "/v1/paint" in dom and "zebra_count" in dom, dom[-2000:]
