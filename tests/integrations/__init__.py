"""The HTTP client integrations, remotedialer.integrations (layer 4)."""
