"""Swagger UI at /docs with no internet access.

FastAPI's stock /docs page loads Swagger UI's JS and CSS from a CDN (jsdelivr), so on an
offline cluster it renders blank. Here the same page is served from the Swagger UI files
bundled in the `fastapi-offline` wheel. Every URL in the page carries the request's
root_path, so it also works behind a Ray Serve route prefix such as /e2e.
"""
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def serve_docs_offline(app: FastAPI, docs_url: str = "/docs") -> None:
    """Add a CDN-free Swagger UI to an app made with FastAPI(..., docs_url=None, redoc_url=None)."""
    if app.openapi_url is None:
        raise ValueError("serve_docs_offline needs the app's openapi_url (the page renders that schema)")
    # swagger-ui-bundle.js, swagger-ui.css and favicon.png (Swagger UI 5.x, which can render OpenAPI 3.1)
    app.mount(ASSETS_URL, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    oauth2_url = app.swagger_ui_oauth2_redirect_url

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{oauth2_url}" if oauth2_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if oauth2_url:  # FastAPI adds this route only with docs_url set; its page is inline, no CDN
        @app.get(oauth2_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()
