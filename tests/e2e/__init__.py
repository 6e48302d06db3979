"""End-to-end tests: real processes, real servers and clients over loopback."""
