"""What nginx (server_tokens off) sends for its error statuses, byte for byte.

The server answers every request that is not a tunnel as a plain nginx would
(docs/security.md): these are its pages and response heads. The Date header
is the caller's, so this module keeps no clock.
"""

from __future__ import annotations


def _page(status: int, reason: str) -> bytes:
    return (
        f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


PAGES = {
    403: ("Forbidden", _page(403, "Forbidden")),
    404: ("Not Found", _page(404, "Not Found")),
    400: ("Bad Request", _page(400, "Bad Request")),
    505: ("HTTP Version Not Supported", _page(505, "HTTP Version Not Supported")),
}
# nginx's page for its status 497, sent as a 400 (ngx_http_error_497_page).
TO_HTTPS_PAGE = (
    b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n"
    b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
    b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def http_response(
    status: int,
    date: str,
    head_only: bool = False,
    keep_alive: bool = False,
    body: bytes | None = None,
) -> bytes:
    """nginx's response for status, Date: date (RFC 7231 form); body replaces
    the status's page (a 400 with nginx's 497 page); head_only for a HEAD."""
    reason, page = PAGES[status]
    body = page if body is None else body
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Server: nginx\r\n"
        f"Date: {date}\r\n"
        "Content-Type: text/html\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def http09_page(method: bytes) -> bytes:
    """nginx's answer to an HTTP/0.9 request on its TLS port: a page with no
    head; only GET exists in HTTP/0.9, anything else is a bad request."""
    return TO_HTTPS_PAGE if method == b"GET" else PAGES[400][1]
