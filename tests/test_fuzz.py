"""Property-based fuzzing of the server's own OpenAPI document (schemathesis, in-process WSGI).

Every operation in /openapi.json gets generated requests (valid and invalid); checks: no 5xx
and, where a response schema is declared, the response conforms to it. The language model is
the fake OpenAI server, images the placeholder. Streaming routes (SSE, WebSocket) are excluded:
a generated request would hold a stream open. The example count is bounded (FUZZ_EXAMPLES,
default 40 per operation, positive and negative) so the file stays within a CI budget of about three minutes.

Known bugs in routes owned by others are excluded below by operation, each with a comment
naming the bug, rather than by loosening the checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from tests.client_facing_app import client_facing_app  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))

# streams: a generated request would open an endless response
STREAMING = r"(/events$|/get_updates/|/stream$|/ws$)"
# operation -> the bug that makes it fail (report to the owner; remove the entry when fixed)
KNOWN_BUGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def fuzz_app(mongo_client: Any, mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with client_facing_app(mongo_client, mongo_uri, tmp_path_factory.mktemp("fuzz"), "fuzz") as app:
        yield app


@pytest.fixture(scope="module")
def api_schema(fuzz_app: Any) -> Any:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    schema = schema.exclude(path_regex=STREAMING)
    for label in KNOWN_BUGS:
        method, path = label.split(" ", 1)
        schema = schema.exclude(method=method, path=path)
    return schema


def _fuzz_operation(operation: Any) -> str | None:
    """Run the bounded examples of one operation; the first failure (with its reproduction) or None."""

    @given(
        case=st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )
    )
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the example as found
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

    try:
        run()
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis raises a BaseExceptionGroup
        return f"{operation.label}: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.slow
def test_openapi_operations_never_5xx_and_match_their_schemas(api_schema: Any) -> None:
    # one loop instead of schemathesis' pytest plugin: its lazy fixture loader (`from_fixture`) reads
    # `request.node._nodeid`, which pytest 9 no longer has
    failures = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        failure = _fuzz_operation(operation)
        if failure:
            failures.append(failure)
    assert operations > 0
    assert not failures, "\n\n".join(failures)


def test_fuzzing_covers_the_apps(api_schema: Any) -> None:
    """The fuzzer really sees the mounted apps' operations (a broken doc would silently test nothing)."""
    paths = {op.ok().path for op in api_schema.get_all_operations()}
    assert "/jobs/{job_id}" in paths and "/auth/stream-token" in paths
    mounted = {p.split("/")[1] for p in paths if p.count("/") >= 2}
    assert {"jobs", "auth"} <= mounted
    assert not any(p.endswith("/events") for p in paths)  # streams are excluded
