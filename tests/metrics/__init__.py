"""Metrics, remotedialer.metrics (layer 4)."""
