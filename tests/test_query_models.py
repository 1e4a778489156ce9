"""Query models build their JSON schema once: flask-openapi3 asks for it on every request
(apps/core/query_models.py says why that matters for read latency)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel

from apps.core.query_models import QueryModel
from apps.refinement.schemas import StimuliQuery


class PlainQuery(BaseModel):
    """A query model that forgot the base class (module level: the route's hints must resolve)."""

    n: int = 1


VALIDATED_PARTS = ("query", "header", "form")  # the parts flask-openapi3 reads a schema for per request


def _route_models(app: Any) -> dict[str, list[tuple[str, type]]]:
    """endpoint -> [(part, model)] for every flask-openapi3 route that validates a query, header or form."""
    found: dict[str, list[tuple[str, type]]] = {}
    for endpoint, view in app.view_functions.items():
        handler = getattr(view, "__wrapped__", None)  # flask-openapi3 wraps the handler with functools.wraps
        if handler is None:
            continue
        hints = typing.get_type_hints(handler)
        for part in VALIDATED_PARTS:
            model = hints.get(part)
            if isinstance(model, type) and issubclass(model, BaseModel):
                found.setdefault(endpoint, []).append((part, model))
    return found


def test_every_validated_query_header_and_form_model_caches_its_schema(openai_app: Any) -> None:
    routes = _route_models(openai_app)
    assert len(routes) >= 8, routes  # the apps' list/history/session routes: the walk found them
    slow = {
        endpoint: [f"{part}: {model.__module__}.{model.__name__}" for part, model in models]
        for endpoint, models in routes.items()
        if any(not issubclass(model, QueryModel) for _, model in models)
    }
    assert not slow, f"derive these from apps.core.query_models.QueryModel: {slow}"


def test_the_walk_sees_a_plain_model() -> None:
    """The check above can say no: a route with a plain BaseModel query is reported."""
    from flask_openapi3 import OpenAPI

    app = OpenAPI(__name__)

    @app.get("/plain")
    def plain(query: PlainQuery) -> dict[str, int]:
        return {"n": query.n}

    ((part, model),) = _route_models(app)["plain"]
    assert part == "query" and model is PlainQuery and not issubclass(model, QueryModel)
    assert app.test_client().get("/plain?n=3").get_json() == {"n": 3}


def test_cached_schema_is_pydantics_and_callers_cannot_change_it() -> None:
    built = BaseModel.model_json_schema.__func__(StimuliQuery)  # pydantic's own, uncached
    first = StimuliQuery.model_json_schema()
    assert first == built
    first["properties"].clear()  # a caller mutating its copy
    assert StimuliQuery.model_json_schema() == built
    key = next(k for k in QueryModel._schemas if k[0] is StimuliQuery)
    cached = QueryModel._schemas[key]
    StimuliQuery.model_json_schema()
    assert QueryModel._schemas[key] is cached  # built once, not per call
    # another argument set is its own entry, and equals pydantic's for those arguments
    ser = StimuliQuery.model_json_schema(mode="serialization")
    assert ser == BaseModel.model_json_schema.__func__(StimuliQuery, mode="serialization")


def test_query_validation_still_reads_lists_and_rejects_bad_values(client: Any) -> None:
    ok = client.get("/refinement/users/nobody/stimuli?limit=2&type=0")
    assert ok.status_code in (200, 401, 403, 404), ok.get_data(as_text=True)
    bad = client.get("/refinement/users/nobody/stimuli?limit=notanumber")
    assert bad.status_code in (400, 422), bad.get_data(as_text=True)
