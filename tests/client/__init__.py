"""The agent, remotedialer.client (layer 3)."""
