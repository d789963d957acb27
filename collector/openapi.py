"""The OpenAPI 3 document at ``/openapi.json``, declared next to each route.

Each API module calls ``operation(...)`` beside its ``Route``; ``document(routes)`` turns
the declarations of the routes the app actually serves into the document, and
``undeclared(routes)`` lists API routes without one (a test keeps it empty). A module
that describes itself as a ready-made OpenAPI path item (``collector.collect``) hands it
to ``register_path`` with the component schemas it refers to. The declarations are
static metadata (like the routes themselves), so module-level tables keyed by
(method, path) are enough; declaring twice replaces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

DOCUMENTED_PREFIXES = ("/api/", "/consent", "/collect")
ERROR_REF = {"$ref": "#/components/schemas/Error"}


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    summary: str
    roles: tuple[str, ...]
    tag: str
    parameters: tuple[Mapping[str, Any], ...] = ()
    responses: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    request_body: Mapping[str, Any] | None = None
    description: str = ""


_OPERATIONS: dict[tuple[str, str], Operation] = {}
# Ready-made operation objects (register_path) and the component schemas they refer to.
_READY: dict[tuple[str, str], dict[str, Any]] = {}
_SCHEMAS: dict[str, dict[str, Any]] = {}
_RESERVED_SCHEMAS = frozenset({"Error"})
# Starlette's "{name:convertor}" is "{name}" in OpenAPI (and in the declarations).
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")


def operation(
    method: str,
    path: str,
    *,
    summary: str,
    roles: Sequence[str] = (),
    tag: str = "api",
    parameters: Sequence[Mapping[str, Any]] = (),
    response: Mapping[str, Any] | None = None,
    csv: bool = False,
    responses: Mapping[str, Mapping[str, Any]] | None = None,
    request_body: Mapping[str, Any] | None = None,
    description: str = "",
) -> None:
    """Declare one operation. ``response`` is the JSON schema of the 200 answer.

    ``roles`` empty means public (no bearer token). Error answers (400 and, for guarded
    routes, 401/403/429) with the shared error schema are added automatically.
    """
    declared = dict(responses or {})
    if response is not None:
        content: dict[str, Any] = {"application/json": {"schema": dict(response)}}
        if csv:
            content["text/csv"] = {"schema": {"type": "string"}}
        declared.setdefault("200", {"description": "OK", "content": content})
    _OPERATIONS[(method.upper(), path)] = Operation(
        method=method.upper(),
        path=path,
        summary=summary,
        roles=tuple(roles),
        tag=tag,
        parameters=tuple(parameters),
        responses=declared,
        request_body=request_body,
        description=description,
    )


def register_path(
    path: str, item: Mapping[str, Mapping[str, Any]], schemas: Mapping[str, Any]
) -> None:
    """Declare every operation of a ready-made path item, as it stands (no error answers
    are added), and the ``#/components/schemas`` it refers to."""
    for name, schema in schemas.items():
        if name in _RESERVED_SCHEMAS or _SCHEMAS.get(name, schema) != schema:
            raise ValueError(f"component schema {name!r} is declared already")
        _SCHEMAS[name] = dict(schema)
    for method, op in item.items():
        _READY[(method.upper(), path)] = dict(op)


def query(
    name: str,
    schema: Mapping[str, Any],
    description: str,
    *,
    required: bool = False,
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": dict(schema),
    }


def path_param(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": dict(schema),
    }


def error(description: str) -> dict[str, Any]:
    """A response with the shared error schema, for ``responses={...}``."""
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def _served(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    found = []
    for route in routes:
        if isinstance(route, Route) and route.path.startswith(DOCUMENTED_PREFIXES):
            path = _CONVERTOR.sub(r"{\1}", route.path)
            for method in sorted(route.methods or ()):
                # HEAD mirrors GET; OPTIONS on /consent is the browser's CORS preflight,
                # part of the HTTP plumbing rather than the API (no client calls it).
                if method not in ("HEAD", "OPTIONS"):
                    found.append((method, path))
    return found


def undeclared(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """API routes the app serves that have no OpenAPI declaration."""
    return [key for key in _served(routes) if key not in _OPERATIONS and key not in _READY]


def _operation_object(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {k: dict(v) for k, v in op.responses.items()}
    responses.setdefault("400", error("Bad parameter (the detail names it)"))
    if op.roles:
        responses.setdefault("401", error("Missing, invalid or revoked bearer token"))
        responses.setdefault("403", error("The token's role may not use this route"))
        responses.setdefault("429", error("Too many failed authentications from this address"))
    responses.setdefault("503", error("The database cannot be reached"))
    out: dict[str, Any] = {
        "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_')}".replace(
            "{", ""
        ).replace("}", ""),
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [dict(p) for p in op.parameters],
        "responses": responses,
    }
    if op.roles:
        out["security"] = [{"bearer": []}]
        out["x-roles"] = list(op.roles)
        roles = ", ".join(op.roles)
        out["description"] = (op.description + "\n\n" if op.description else "") + (
            f"Roles: {roles}."
        )
    else:
        out["security"] = []
        if op.description:
            out["description"] = op.description
    if op.request_body is not None:
        out["requestBody"] = dict(op.request_body)
    return out


def document(routes: Iterable[BaseRoute], version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.0 document for the declared operations of the routes served."""
    served = set(_served(routes))
    operations: dict[tuple[str, str], dict[str, Any]] = {
        **{key: _operation_object(op) for key, op in _OPERATIONS.items() if key in served},
        **{key: dict(op) for key, op in _READY.items() if key in served},
    }
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in sorted(operations.items(), key=lambda item: item[0][::-1]):
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "collector API",
            "version": version,
            "description": (
                "Consent-gated statistics pixel of the KDV store. Every call is audited "
                "(policy 5.5); analysts see aggregates only (3.4, 6.2.2)."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
                **_SCHEMAS,
            },
        },
    }


def openapi_route(routes: Callable[[], Iterable[BaseRoute]]) -> Route:
    """``GET /openapi.json`` for the routes ``routes()`` returns at request time."""

    async def endpoint(request: Request) -> Response:
        return JSONResponse(document(routes()))

    return Route("/openapi.json", endpoint, methods=["GET"])
