"""Sans-I/O wire code: the PROXY header, client addresses, request lines,
request-head verdicts, nginx's pages and the close schedule."""
