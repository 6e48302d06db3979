"""The WebSocket transports (layer 2)."""
