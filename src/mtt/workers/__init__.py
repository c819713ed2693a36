"""Processes: the supervisor and its workers, their RPC, and per-process settings."""
