"""The API under schemathesis: generated requests per role and without a token.

Against a live ``collector serve`` on loopback, every operation in the OpenAPI document is
called with hypothesis-generated parameters as each role (analyst, engineer, admin) and
anonymously; every response must match the documented status codes, content type and
schema, and no response may be a 5xx. The anonymous pass runs last: after ten failures
the source is rate limited (429), which the document declares.

``/openapi.json`` comes from ``collector/openapi.py``; the harness itself is proven on a
small hand-written document for the admin routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.test_security import TOKEN_ROLES, make_tokens

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.slow
EXAMPLES = 40  # per operation and per role: bounded, the suite stays under a minute
PUBLIC = (
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/p.gif",
    "/dashboard",
    "/static",
    "/demo",
    "/consent",
    "/collect",
)


def fuzz(schema: Any, base_url: str, tokens: dict[str, str]) -> int:
    """Run every operation as each role, then anonymously; the number of calls made."""
    passes: list[dict[str, str]] = [
        {"authorization": f"Bearer {tokens[role]}"} for role in TOKEN_ROLES
    ]
    passes.append({})
    calls = 0
    for headers in passes:
        for result in schema.get_all_operations():
            calls += _fuzz_operation(result.ok(), base_url, headers)
    return calls


# Rules between parameters that OpenAPI 3.0 cannot state (the operations' descriptions
# say them). A schema-valid request may get a 400 for breaking one of these and only
# these: any other 400 on schema-valid input means the document is looser than the route.
CROSS_PARAMETER_RULES: dict[str, re.Pattern[str]] = {
    "/api/stats/": re.compile(
        r"must not be after to|range may span at most|hour allows at most|"
        r"at most one filter|group by one of|can be filtered by|cannot be filtered by"
    ),
    "/api/admin/subjects": re.compile(r"^name exactly one subject"),
    "/api/admin/incident": re.compile(r"^to: must be after from"),
}


def _fuzz_operation(operation: Any, base_url: str, headers: dict[str, str]) -> int:
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

    calls = 0
    rules = [
        rule for path, rule in CROSS_PARAMETER_RULES.items() if operation.path.startswith(path)
    ]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        nonlocal calls
        calls += 1
        # ignored_auth would replay without our header and misread the result: the token
        # rides in explicit headers, and the anonymous pass checks that no operation
        # answers without one. positive_data_acceptance is replaced by the narrower check
        # below, which knows the cross-parameter rules.
        response = case.call_and_validate(
            base_url=base_url,
            headers=headers,
            excluded_checks=[ignored_auth, positive_data_acceptance],
        )
        assert response.status_code < 500
        if not headers and not operation.path.startswith(PUBLIC):
            assert response.status_code in (401, 429), operation.path
        if response.status_code == 400:
            detail = str(response.json().get("detail", ""))
            assert any(rule.search(detail) for rule in rules), (
                f"{case.method} {case.formatted_path}: schema-valid request rejected: {detail}"
                f"\n{case.as_curl_command()}"
            )

    call()
    return calls


_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code in codes
    }


def admin_document() -> dict[str, Any]:
    """A minimal OpenAPI 3.0 description of /api/whoami and /api/audit."""
    entry = {
        "type": "object",
        "required": ["id", "ts_ms", "actor", "action", "outcome"],
        "properties": {
            "id": {"type": "integer"},
            "ts_ms": {"type": "integer"},
            "actor": {"type": "string"},
            "role": {"type": "string", "nullable": True},
            "action": {"type": "string"},
            "subject": {"type": "string", "nullable": True},
            "outcome": {"type": "string"},
        },
    }
    auth = _errors(401, 403, 429)
    return {
        "openapi": "3.0.3",
        "info": {"title": "collector admin (test fixture)", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/whoami": {
                "get": {
                    "responses": {
                        "200": {
                            "description": "the caller",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["name", "role"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "role": {
                                                "type": "string",
                                                "enum": ["analyst", "engineer", "admin"],
                                            },
                                        },
                                        "additionalProperties": False,
                                    }
                                }
                            },
                        },
                        **auth,
                    }
                }
            },
            "/api/audit": {
                "get": {
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "before_id",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 2**62},
                        },
                        {"name": "action", "in": "query", "schema": {"type": "string"}},
                        {"name": "subject", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "audit records, newest first",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["items", "count"],
                                        "properties": {
                                            "items": {"type": "array", "items": entry},
                                            "count": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        },
                        **_errors(400),
                        **auth,
                    },
                }
            },
        },
    }


def test_api_matches_its_openapi_document_for_every_role(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    import asyncio

    tokens = asyncio.run(make_tokens(tmp_path))
    server = serve()
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    calls = fuzz(schema, server.url, tokens)
    print(f"schemathesis: {calls} calls against /openapi.json")
    server.stop()
    assert "Traceback" not in server.log.read_text(errors="replace")


def test_fuzz_harness_on_the_admin_routes(serve: Callable[..., Server], tmp_path: Path) -> None:
    import asyncio

    tokens = asyncio.run(make_tokens(tmp_path))
    server = serve()
    schema = schemathesis.openapi.from_dict(admin_document())
    calls = fuzz(schema, server.url, tokens)
    print(f"schemathesis: {calls} calls against the admin fixture document")
    assert calls >= 4 * 2 * 5
    server.stop()
    assert "Traceback" not in server.log.read_text(errors="replace")


def test_fuzz_harness_catches_an_undocumented_response(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # The harness must fail when the server answers something the document does not say:
    # here the document forgets that /api/whoami can answer 401.
    import asyncio

    tokens = asyncio.run(make_tokens(tmp_path))
    server = serve()
    document = admin_document()
    del document["paths"]["/api/audit"]
    del document["paths"]["/api/whoami"]["get"]["responses"]["401"]
    schema = schemathesis.openapi.from_dict(document)
    with pytest.raises(BaseExceptionGroup, match="Undocumented status code"):
        fuzz(schema, server.url, tokens)
