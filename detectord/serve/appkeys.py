"""The typed keys of the aiohttp application's state, shared by every module with handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from detectord.serve.server import Server

SERVER_KEY: web.AppKey[Server] = web.AppKey("server")
