"""The browser chat page: GET / and its static assets, with strict security headers.

The page is plain files in app/static (HTML, CSS, ES modules, no build step). Assets are
served by explicit routes rather than a StaticFiles mount because `include_router` does not
carry mounts over, and because an allowlist of the files that ship is the smallest surface:
only names found in app/static at import time can be fetched, never a path outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# A strict policy: no inline script or style, nothing from other origins, no framing.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate on every load (cheap: FileResponse sends ETag/Last-Modified), so an
    # upgraded server never runs against a stale cached script.
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

router = APIRouter(tags=["page"])


def _asset_names() -> dict[str, Path]:
    """The files that may be served: plain files directly in app/static with a known type."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir()
            if p.is_file() and _SAFE_NAME.match(p.name) and p.suffix in MEDIA_TYPES}


ASSETS = _asset_names()


def _file(path: Path) -> Response:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def index() -> Response:
    """The browser chat page."""
    page = ASSETS.get("index.html")
    if page is None:
        raise HTTPException(status_code=404, detail="The chat page is not installed (app/static/index.html).")
    return _file(page)


@router.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
def favicon() -> Response:
    """Browsers ask for /favicon.ico on their own; answer with the SVG icon."""
    icon = ASSETS.get("favicon.svg")
    if icon is None:
        raise HTTPException(status_code=404, detail="No icon.")
    return _file(icon)


@router.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
def asset(name: str) -> Response:
    """One of the page's static files (by exact name; no paths)."""
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"No static file named {name!r}.")
    return _file(path)
