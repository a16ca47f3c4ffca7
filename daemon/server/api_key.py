"""An API key for an HTTP front (a decode daemon's, a router's): read once at start from a file
or an environment variable — never from the deployment file, never logged — and asked of every
request to the OpenAI API (`/v1/...`) as `Authorization: Bearer <key>`, which is what OpenAI's
clients send. A request without it, or with another key, gets a 401 in OpenAI's error shape.
`/health`, `/status` and `/metrics` stay open to probes and scrapers.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

API_PREFIX = "/v1/"


def read_api_key(file: str | None, env: str | None) -> str | None:
    """The key `file` holds (surrounding whitespace dropped) or the variable `env` names; None
    when neither is configured. ValueError naming the source (not the key) when it is empty or
    cannot be read."""
    if file is not None:
        try:
            key = Path(file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"api_key_file={file!r}: {exc.strerror or exc}") from None
        source = f"api_key_file={file!r}"
    elif env is not None:
        key, source = os.environ.get(env, "").strip(), f"api_key_env={env!r}"
    else:
        return None
    if not key:
        raise ValueError(f"{source}: the API key is empty")
    return key


class RequireApiKey:
    """ASGI middleware: `/v1/...` requests must carry the key; everything else passes."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await _refuse(send, "a valid API key is required (Authorization: Bearer <key>)")
                return
        await self.app(scope, receive, send)


async def _refuse(send, message: str) -> None:
    error = {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}
    body = json.dumps({"error": {**error, "param": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
