"""The tunnel core (layer 1): codecs, connections, sessions, piping."""
