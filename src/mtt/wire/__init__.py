"""Sans-I/O wire code: the PROXY header, client addresses, request lines,
request-head verdicts and nginx's pages."""
