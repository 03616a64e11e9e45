"""The status page, the instance pages and their scripts and style: static files from the
package's `ui/` folder, written here (no CDN, nothing fetched from elsewhere); they read the JSON API.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from aiohttp import web

UI = Path(str(resources.files("detectord.serve") / "ui"))
_NAME = re.compile(r"[a-z0-9_-][a-z0-9_.-]{0,63}")
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}
# The pages change with the daemon; a browser asks again each time (an unchanged file costs a 304).
# The pages load nothing but what detectord serves, and no other site may frame them.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}


async def _file(request: web.Request, name: str) -> web.StreamResponse:
    path = UI / name
    kind = _TYPES.get(path.suffix)
    if not _NAME.fullmatch(name) or kind is None or not path.is_file():
        return web.Response(status=404, text="no such file\n")
    return web.FileResponse(path, headers={**_HEADERS, "Content-Type": f"{kind}; charset=utf-8"})


async def handle_index(request: web.Request) -> web.StreamResponse:
    return await _file(request, "index.html")


async def handle_instance_page(request: web.Request) -> web.StreamResponse:
    return await _file(request, "instance.html")


async def handle_ui(request: web.Request) -> web.StreamResponse:
    return await _file(request, request.match_info["name"])
