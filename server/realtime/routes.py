"""WebSocket /v1/realtime."""

from fastapi import APIRouter

router = APIRouter()
