"""Where the user table and its counters live between restarts (and between nodes)."""
