"""The server side, remotedialer.server (layer 3)."""
