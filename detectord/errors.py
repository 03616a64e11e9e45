"""One exception hierarchy for detectord; each class builds its own message and keeps its data."""

from __future__ import annotations


class DetectordError(Exception):
    """Base of every error detectord raises on purpose."""


class ConfigError(DetectordError):
    """A config file (or flag) is invalid; `key` names the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class RemoteWriteError(DetectordError):
    """A remote-write request that will not be accepted; `status` is the HTTP answer, `version`
    the protocol its headers asked for where that much was understood."""

    def __init__(self, status: int, reason: str, *, version: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        super().__init__(f"{status}: {reason}")


class RemoteReadError(DetectordError):
    """A remote read that failed: a bad selector, an error answer (`status`, and the start of its
    `body`), a corrupt response or a timeout; `url` is the endpoint where one was asked."""

    def __init__(self, reason: str, *, url: str | None = None, status: int | None = None, body: bytes = b"") -> None:
        self.reason = reason
        self.url = url
        self.status = status
        self.body = body[:200]
        parts = [url] if url else []
        if status is not None:
            parts.append(f"HTTP {status}")
        parts.append(reason)
        text = self.body.decode("utf-8", "replace").strip()
        if text:
            parts.append(text + ("..." if len(body) > 200 else ""))
        super().__init__(": ".join(parts))


class ModelError(DetectordError):
    """A model artifact that cannot be loaded or does not fit the configuration."""
