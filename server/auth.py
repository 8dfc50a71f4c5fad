"""Who may call: API keys on /v1 (Bearer header; on the WebSocket also the browser's subprotocol form), the
WebSocket Origin allow-list, and no inference from the cross-site POSTs a browser sends without asking."""

from __future__ import annotations

import hmac
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from omnitalk.server.errors import error_body
from omnitalk.server.settings import ServerSettings

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."
# What a browser may POST to another site without a preflight: such a body never reaches the engine.
_SIMPLE_CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


class Guard:
    """ASGI middleware in front of every route; refusals go out before anything is read or upgraded."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.keys = [key.encode() for key in settings.all_api_keys()]
        self.guarded = ("/v1/", "/metrics") if settings.api_key_guards_metrics else ("/v1/",)
        self.origins = set(settings.allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _respond(send, *refusal)
        else:
            await _refuse_upgrade(scope, receive, send, *refusal)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, dict] | None:
        """(status, OpenAI error body) when the request must not go on."""
        origin = headers.get("origin")
        unsafe = scope["type"] == "websocket" or scope["method"] == "POST"  # what a foreign page must not start
        if origin is not None and unsafe and not self._origin_allowed(origin, scope, headers):
            return 403, error_body(f"origin {origin!r} is not allowed (see --allowed-origins)", "invalid_request_error",
                                   code="origin_not_allowed")  # fmt: skip
        if scope["type"] == "http" and scope["method"] == "POST":
            mime = headers.get("content-type", "").split(";")[0].strip().lower()
            if mime in _SIMPLE_CONTENT_TYPES:
                message = f"Content-Type {mime} is not accepted: send the request as application/json"
                return 415, error_body(message, "invalid_request_error", code="unsupported_media_type")
        if self.keys and scope["path"].startswith(self.guarded) and not self._authorized(scope, headers):
            offered = _offered_key(scope, headers) is not None
            message = "Incorrect API key provided." if offered else "You didn't provide an API key."
            message += " Send it as 'Authorization: Bearer <key>' (on the WebSocket, also as the subprotocol "
            message += f"{SUBPROTOCOL_KEY_PREFIX}<key>)."
            return 401, error_body(message, "invalid_request_error", code="invalid_api_key")
        return None

    def _authorized(self, scope: Scope, headers: Headers) -> bool:
        offered = _offered_key(scope, headers)
        if offered is None:
            return False
        matched = False
        for key in self.keys:  # every key compared, in constant time: no early exit tells which one is close
            matched |= hmac.compare_digest(offered.encode(), key)
        return matched

    def _origin_allowed(self, origin: str, scope: Scope, headers: Headers) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        host = headers.get("host")
        secure = scope.get("scheme") in ("https", "wss")
        return host is not None and origin == f"{'https' if secure else 'http'}://{host}"  # the server's own page


def _offered_key(scope: Scope, headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scope["type"] == "websocket":
        for protocol in scope.get("subprotocols", ()):
            if protocol.startswith(SUBPROTOCOL_KEY_PREFIX):
                return protocol[len(SUBPROTOCOL_KEY_PREFIX) :]
    return None


async def _respond(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _refuse_upgrade(scope: Scope, receive: Receive, send: Send, status: int, body: dict) -> None:
    """An HTTP answer instead of the upgrade where the server can send one; else a policy-violation close."""
    if (await receive())["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await _respond(lambda m: send({**m, "type": m["type"].replace("http.", "websocket.http.", 1)}), status, body)
    else:
        await send({"type": "websocket.close", "code": 1008})
