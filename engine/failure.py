"""The one error a failed engine stage raises into the requests it held; its message is safe to show clients."""

from __future__ import annotations


class EngineFailure(RuntimeError):
    """A stage (the thinker's EngineCore, its hidden-state rows, the speech thread) failed under this request:
    the request is lost through no fault of the client. The details are in the server's log."""
