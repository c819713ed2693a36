"""Peers that the tests and the benchmarks both start: the server under test
as a process, and Go programs built from Debian's packages."""
