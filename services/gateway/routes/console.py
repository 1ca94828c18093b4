"""/console: the web console, static files from services/gateway/console served as they are (no build step, nothing
fetched at run time). The console signs in with an API key kept in the browser's session storage and talks only to
the public /v1 API, so it can do no more than the key can; these routes need no key and serve no data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ..errors import ApiError

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

# Everything the console loads comes from this origin; images may also be the blob: URLs of images fetched with the
# key (the API's image routes need the Authorization header, which an <img src> cannot send).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    # Revalidated on every load (cheap: ETag), so that a new gateway version is picked up at once.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(folder: Path = CONSOLE_DIR) -> dict[str, Asset]:
    """Every servable file under ``folder`` by its relative path (read once, at import: the set of files is fixed,
    so a request can name nothing else)."""
    assets = {}
    for path in sorted(folder.rglob("*")):
        media_type = MEDIA_TYPES.get(path.suffix)
        if not path.is_file() or media_type is None or any(part.startswith(".") for part in path.parts):
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.relative_to(folder).as_posix()] = Asset(body, media_type, etag)
    return assets


ASSETS = load_assets()

router = APIRouter(tags=["console"], include_in_schema=False)


def _serve(request: Request, name: str) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        raise ApiError(404, "not_found", f"the console has no file {name!r}")
    headers = {**HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.api_route("/favicon.ico", methods=["GET", "HEAD"])
async def favicon(request: Request) -> Response:
    """What a browser asks every origin for (on /docs, /healthz, ...): the console's icon, not a 404 in the logs."""
    return _serve(request, "favicon.svg")


@router.api_route("/console", methods=["GET", "HEAD"])
async def console_root() -> Response:
    """The console lives at /console/ so that its files load by relative URLs (behind a path prefix too)."""
    return RedirectResponse("console/", status_code=308, headers=HEADERS)


@router.api_route("/console/", methods=["GET", "HEAD"])
async def console_index(request: Request) -> Response:
    return _serve(request, "index.html")


@router.api_route("/console/{name:path}", methods=["GET", "HEAD"])
async def console_asset(name: str, request: Request) -> Response:
    return _serve(request, name)
