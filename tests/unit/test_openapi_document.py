"""The packaged OpenAPI document: valid OpenAPI 3.1, and it covers every opt."""

from __future__ import annotations

import importlib.resources
import json
from typing import Any

import schemathesis

from mtt.config import Limits
from mtt.core.commands import Opt

PROBES = ("/healthz", "/readyz")


def _document() -> dict[str, Any]:
    text = importlib.resources.files("mtt.controller").joinpath("openapi.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_the_document_is_valid_openapi() -> None:
    schema = schemathesis.openapi.from_dict(_document())
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {
        "POST /",
        "GET /",
        "GET /openapi.json",
        "GET /metrics",
        "GET /healthz",
        "GET /readyz",
    }


def test_every_opt_is_documented() -> None:
    doc = _document()
    body = doc["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    variants = [_resolve(doc, v) for v in _resolve(doc, body)["oneOf"]]
    documented = {v["properties"]["opt"]["const"] for v in variants}
    missing = {int(opt) for opt in Opt} - documented
    assert not missing, f"opts without a request schema: {sorted(missing)}"


def test_every_opt_has_an_example() -> None:
    doc = _document()
    examples = doc["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    missing = {int(opt) for opt in Opt} - {e["value"]["opt"] for e in examples.values()}
    assert not missing, f"opts without an example: {sorted(missing)}"


def test_every_reply_status_carries_the_reply_shape() -> None:
    """Go panels read res and current_users whatever the status: no bare error pages."""
    doc = _document()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, declared in operation["responses"].items():
                response = _resolve(doc, declared)
                if path == "/metrics" and status == "200":
                    continue
                content = response["content"]
                assert list(content) == ["application/json"], (method, path, status)
                if path == "/openapi.json" and status == "200":
                    continue
                if path in PROBES:  # for probes, not panels: their own small shape
                    continue
                schema = _resolve(doc, content["application/json"]["schema"])
                assert schema["allOf"][0] == {"$ref": "#/components/schemas/Reply"}, (
                    method,
                    path,
                    status,
                )


def test_the_documented_path_length_is_the_servers() -> None:
    """The schema's maxLength of a user path is the bound the controller applies."""
    doc = _document()
    lengths = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "path" in node.get("properties", {}):
                lengths.add(_resolve(doc, node["properties"]["path"]).get("maxLength"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert lengths == {Limits().max_user_path}


def test_the_probes_need_no_token_and_say_only_generic_reasons() -> None:
    doc = _document()
    for path in PROBES:
        assert doc["paths"][path]["get"]["security"] == []
    reasons = doc["components"]["schemas"]["Unready"]["properties"]["reasons"]["items"]
    assert set(reasons["enum"]) == {"starting", "stopping", "listener", "store", "workers"}
