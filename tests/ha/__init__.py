"""High availability, remotedialer.ha (layer 4)."""
