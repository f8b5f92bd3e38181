"""Merging the services' OpenAPI documents into one."""

from __future__ import annotations

from typing import Any

from gateway.openapi import merge


def document(paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def operation(schema: str) -> dict[str, Any]:
    return {
        "get": {"responses": {"200": {"content": {"application/json": {"schema": ref(schema)}}}}}
    }


PROBLEM = {"type": "object", "properties": {"status": {"type": "integer"}}}


def test_routed_paths_are_kept_and_tagged_with_their_service() -> None:
    merged = merge(
        {
            "order": document(
                {"/orders": operation("Order"), "/health": operation("Problem")},
                {"Order": {"type": "object"}, "Problem": PROBLEM},
            ),
            "user": document({"/users/{user_id}": operation("View")}, {"View": {"type": "string"}}),
        },
        version="9.9",
    )
    assert set(merged["paths"]) == {"/orders", "/users/{user_id}"}
    assert merged["paths"]["/orders"]["get"]["tags"] == ["order"]
    assert merged["tags"] == [{"name": "order"}, {"name": "user"}]
    assert merged["info"]["version"] == "9.9"
    assert merged["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert merged["x-unavailable"] == ["inventory", "payment"]


def test_one_name_for_two_different_schemas_is_split_and_references_follow() -> None:
    merged = merge(
        {
            "inventory": document(
                {"/products": operation("View")},
                {"View": {"type": "object", "title": "product"}, "Problem": PROBLEM},
            ),
            "payment": document(
                {"/payments": operation("View")},
                {"View": {"type": "object", "title": "payment"}, "Problem": PROBLEM},
            ),
        },
        version="1",
    )
    schemas = merged["components"]["schemas"]
    assert schemas["View"]["title"] == "product"
    assert schemas["payment.View"]["title"] == "payment"
    assert "payment.Problem" not in schemas  # identical schemas are shared, not split
    answer = merged["paths"]["/payments"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == ref("payment.View")
    products = merged["paths"]["/products"]["get"]["responses"]["200"]
    assert products["content"]["application/json"]["schema"] == ref("View")


def test_nothing_known_is_an_empty_document_naming_every_service_unavailable() -> None:
    merged = merge({}, version="1")
    assert merged["paths"] == {}
    assert merged["x-unavailable"] == ["inventory", "order", "payment", "user"]
