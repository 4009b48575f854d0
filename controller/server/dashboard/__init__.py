"""The web dashboard: plain HTML, JavaScript modules and CSS served by `controller serve`.

The files under `static/` ship inside the Python package (no build step, no framework,
no network access from the browser beyond this server). `GET /` is the page; the
scripts and the stylesheet are under `/ui/`. Everything the page shows comes from the
REST API under /api/v1 (the dashboard's own additions are in `routes_pipelines`); the
task statuses and their display groups come from `GET /api/v1/statuses` (`statuses.js`).

Decisions:

- **Same port, same token.** The token middleware guards these paths like the API. A
  browser opens `/?token=...` once: the middleware sets the `conveyor_token` cookie
  (HttpOnly, SameSite=Strict) and redirects to `/` without the token; the page's API
  calls then carry the cookie. Without the token it gets an HTML page saying how to pass
  it (`unauthorized_page`).
- **Only known files.** Assets are read once at startup into memory (they are small);
  `/ui/<name>` serves exactly those names, so no path ever reaches the file system.
- **Caching.** Assets carry an ETag and `Cache-Control: no-cache`: the browser revalidates
  (a 304 costs nothing) and always runs the version the server ships.
- **Locked down.** The page is sent with a Content-Security-Policy allowing scripts,
  styles, images and API calls from this server only, and no framing.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

import controller
from controller.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: URL path under which the dashboard's scripts and stylesheet are served.
ASSETS_PATH = "/ui/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
_PAGE_FILE = "index.html"
_UNAUTHORIZED_FILE = "unauthorized.html"


@dataclass(frozen=True)
class Asset:
    """One static file, in memory."""

    body: bytes
    content_type: str
    etag: str


def is_dashboard_path(path: str) -> bool:
    """True for the dashboard's page and assets (answered as HTML, not JSON, on 401)."""
    return path == "/" or path.startswith(ASSETS_PATH)


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every servable file of `directory` (by file name), with the version filled in."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes().replace(b"__VERSION__", controller.__version__.encode())
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[path.name] = Asset(body, content_type, etag)
    return assets


def unauthorized_page(wrong_token: bool, base_url: str = "http://HOST:PORT/") -> bytes:
    """The HTML answer to a browser without the right token: how to pass it.

    `base_url` is the dashboard's address as the browser asked for it (shown escaped).
    """
    template = (STATIC_DIR / _UNAUTHORIZED_FILE).read_text(encoding="utf-8")
    why = (
        "The token given is not this server's token."
        if wrong_token
        else "This Conveyor server requires its API token."
    )
    page = template.replace("__WHY__", html.escape(why)).replace("__URL__", html.escape(base_url))
    return page.encode()


def _asset_response(asset: Asset, request: Request, *, page: bool = False) -> Response:
    headers = {"etag": asset.etag, "cache-control": "no-cache"}
    if page:
        headers.update(SECURITY_HEADERS)
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(content=asset.body, media_type=asset.content_type, headers=headers)


def add_dashboard_routes(r: APIRouter, assets: dict[str, Asset] | None = None) -> None:
    """Add `GET /` (the page) and `GET /ui/{name}` (its scripts and stylesheet) to `r`."""
    files = load_assets() if assets is None else assets
    page = files[_PAGE_FILE]

    @r.get("/", include_in_schema=False)
    async def dashboard_page(request: Request) -> Response:
        return _asset_response(page, request, page=True)

    @r.get(ASSETS_PATH + "{name}", include_in_schema=False)
    async def dashboard_asset(name: str, request: Request) -> Response:
        asset = files.get(name)
        if asset is None or name in (_PAGE_FILE, _UNAUTHORIZED_FILE):
            raise NotFoundError(f"no dashboard file {name!r}", field="name")
        return _asset_response(asset, request)
