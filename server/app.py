"""The FastAPI application: routes stay thin and map engine results onto the wire."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

MISSING = (
    "/v1/chat/completions and the /v1/realtime WebSocket are not implemented yet: "
    "this build serves /health and /v1/models only."
)


def create_app(model_dir: Path, model_name: str) -> FastAPI:
    app = FastAPI(title="omnitalk")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "omnitalk", "root": str(model_dir)}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions() -> JSONResponse:
        error = {
            "message": MISSING,
            "type": "not_implemented_error",
            "param": None,
            "code": "not_implemented",
        }
        return JSONResponse({"error": error}, status_code=501)

    return app
