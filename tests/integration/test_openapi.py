"""The running controller against its own OpenAPI document, with schemathesis.

Schemathesis generates requests from the document (valid ones and ones that
break it), sends them to a real server and checks every reply: no 5xx, a
documented status, the documented content type, a body that fits the schema.
Derandomized so CI sees the same requests on every run.
"""

from __future__ import annotations

import http.client
import importlib.resources
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mtt.core.commands import Opt
from tests.support import ServerProcess, running_server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
TOKEN = "openapi-test-token"


def _schema(server: ServerProcess, **kwargs: Any) -> Any:
    """The document as the server serves it, aimed at that server."""
    base = f"http://{server.controller}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=10, **kwargs)
    schema.config.update(base_url=base)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
    )
    return schema


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    with running_server() as server:
        yield server


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    with running_server("-c-token", TOKEN) as server:
        server.token = TOKEN
        yield server


@pytest.fixture(scope="module")
def open_controller(open_server: ServerProcess) -> Any:
    return _schema(open_server)


@pytest.fixture(scope="module")
def guarded_controller(guarded_server: ServerProcess) -> Any:
    schema = _schema(guarded_server, headers={"Authorization": f"Bearer {TOKEN}"})
    schema.config.generation.update(with_security_parameters=False)
    return schema


def _get(server: ServerProcess, path: str, token: str = "") -> tuple[int, str, bytes]:
    host, port = server.controller.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def _document() -> dict[str, Any]:
    text = importlib.resources.files("mtt.controller").joinpath("openapi.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


_DOC = _document()
OPERATIONS = [(path, method.upper()) for path, item in _DOC["paths"].items() for method in item]
# The health probes need no token (security: []): the 401 test leaves them out.
GUARDED = [
    (path, method)
    for path, method in OPERATIONS
    if _DOC["paths"][path][method.lower()].get("security") != []
]
EXAMPLES = _DOC["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["examples"]
# Until the design 7-8 controller lands (opts 4 5 6, revision in every reply,
# GET /metrics), replies lack revision and the new opts are 400s. Strict, so
# the marks must go once it passes; keyed on Opt so they lapse with api.py.
_PENDING = pytest.mark.xfail(
    not hasattr(Opt, "REPLACE"),
    reason="the design 7-8 controller (opts 4-6, revision, /metrics) is not in this tree yet",
    strict=True,
)


def _params(pairs: list[tuple[str, str]], *, except_doc: bool) -> list[Any]:
    return [
        pytest.param(
            path,
            method,
            id=f"{method} {path}",
            marks=() if except_doc and path == "/openapi.json" else _PENDING,
        )
        for path, method in pairs
    ]


CASE_SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _run(operation: Any, max_examples: int, test: Callable[[Any], None]) -> None:
    """Hypothesis over valid and invalid requests for one operation."""
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    given(case=strategy)(settings(CASE_SETTINGS, max_examples=max_examples)(test))()


@pytest.mark.parametrize(("path", "method"), _params(OPERATIONS, except_doc=True))
def test_replies_fit_the_document(open_controller: Any, path: str, method: str) -> None:
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS, timeout=10)

    _run(open_controller[path][method], 150, check)


@_PENDING
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_documented_examples_succeed(
    open_server: ServerProcess, open_controller: Any, name: str
) -> None:
    """Each example in the document is accepted, and its reply fits."""
    if EXAMPLES[name]["value"]["opt"] == Opt.HARVEST:
        # Generated requests may have left a harvest pending: one at a time.
        _, pending = open_server.control({"opt": Opt.PENDING})
        if pending["harvest_id"]:
            open_server.control({"opt": Opt.ACK, "harvest_id": pending["harvest_id"]})
    case = open_controller["/"]["POST"].Case(
        body=EXAMPLES[name]["value"], media_type="application/json"
    )
    response = case.call_and_validate(checks=CHECKS, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("path", "method"), _params(GUARDED, except_doc=False))
def test_without_the_token_every_reply_is_a_documented_401(
    guarded_controller: Any, path: str, method: str
) -> None:
    """No Authorization sent (or a generated, wrong one): 401 in the reply shape."""

    def check(case: Any) -> None:
        response = case.call(timeout=10)
        assert response.status_code == 401, response.text
        case.validate_response(response, checks=CHECKS)

    _run(guarded_controller[path][method], 20, check)


def test_the_served_document_is_the_packaged_one(open_server: ServerProcess) -> None:
    packaged = importlib.resources.files("mtt.controller").joinpath("openapi.json").read_bytes()
    assert _get(open_server, "/openapi.json") == (200, "application/json", packaged)


def test_post_to_the_document_path_is_still_a_command(open_server: ServerProcess) -> None:
    """Go panels may POST to any path; /openapi.json is no exception."""
    host, port = open_server.controller.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/openapi.json", body=b'{"opt": 9}')
        response = conn.getresponse()
        status, reply = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert (status, reply["res"], reply["err_string"]) == (200, 1, "")


def test_the_document_needs_the_token_when_there_is_one(guarded_server: ServerProcess) -> None:
    status, content_type, body = _get(guarded_server, "/openapi.json")
    assert (status, content_type) == (401, "application/json")
    assert json.loads(body)["res"] == 2
    status, _, body = _get(guarded_server, "/openapi.json", token="wrong")
    assert status == 401
    status, _, body = _get(guarded_server, "/openapi.json", token=TOKEN)
    assert status == 200 and json.loads(body)["openapi"] == "3.1.0"
