"""The user service: the authoritative table, admission, counters, and the
meters tunnels count into."""
