"""The OpenAI Realtime (GA) protocol over WebSocket."""
