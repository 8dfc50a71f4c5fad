"""Errors in OpenAI's shape, and the one table that maps exceptions to HTTP status codes."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.media import MediaError
from omnitalk.engine.thinker.engine import ThinkerInputError
from omnitalk.engine.thinker.prompt import PromptError
from omnitalk.server.state import Busy

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an OpenAI type and code, raised by the serving layer."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def to_api_error(error: Exception) -> APIError:
    """The table: what each failure means for a client."""
    match error:
        case APIError():
            return error
        case Busy():
            return APIError(str(error), 429, "rate_limit_error", code="too_many_streams")
        case MediaError() | ThinkerInputError() | PromptError():
            return APIError(str(error), 400)
        case EngineFailure():
            log.error("request failed: %s", error)
            return APIError(f"{error}; retry the request", 500, "server_error", code="engine_failure")
        case _:  # an internal failure, whatever its type (a ValueError inside the engine is not the client's fault)
            reference = f"error_{uuid.uuid4().hex[:12]}"
            log.error("internal error %s", reference, exc_info=error)
            return APIError(f"internal server error (reference {reference})", 500, "server_error")


def error_response(error: Exception) -> JSONResponse:
    api = to_api_error(error)
    headers = {"Retry-After": str(Busy.retry_after)} if api.status == 429 else None
    return JSONResponse(error_body(api.message, api.type, api.param, api.code), api.status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", where or None), 400)

    @app.exception_handler(HTTPException)
    async def http(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), error.status_code)

    async def mapped(_: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    for kind in (APIError, Busy, MediaError, ThinkerInputError, PromptError, Exception):
        app.add_exception_handler(kind, mapped)
