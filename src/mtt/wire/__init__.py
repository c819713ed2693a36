"""Sans-I/O wire code: the PROXY header, client addresses, request lines, the close schedule."""
