"""The base of every query-string model a route declares.

flask-openapi3 (4.3.2, the newest) asks a route's query model for its whole JSON schema on every
request, only to see which fields are lists. pydantic builds that schema from scratch each time:
about 0.5 ms per call on an idle core, 14 % of a worker's CPU under the paced-read load of
`python bench/load.py`. A model's schema cannot change after its class is built, so it is built once
per class and set of arguments; callers get a copy, so nothing they change leaks into the next one.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from pydantic import BaseModel
from pydantic.json_schema import DEFAULT_REF_TEMPLATE, GenerateJsonSchema, JsonSchemaMode


class QueryModel(BaseModel):
    """A route's query parameters; its JSON schema is built once per class (see the module docstring)."""

    _schemas: ClassVar[dict[tuple[Any, ...], dict[str, Any]]] = {}

    @classmethod
    def model_json_schema(
        cls,
        by_alias: bool | None = None,
        ref_template: str = DEFAULT_REF_TEMPLATE,
        schema_generator: type[GenerateJsonSchema] = GenerateJsonSchema,
        mode: JsonSchemaMode = "validation",
        **kwargs: Any,
    ) -> dict[str, Any]:
        key = (cls, by_alias, ref_template, schema_generator, mode, tuple(sorted(kwargs.items())))
        schema = QueryModel._schemas.get(key)
        if schema is None:
            schema = super().model_json_schema(
                by_alias=by_alias,
                ref_template=ref_template,
                schema_generator=schema_generator,
                mode=mode,
                **kwargs,
            )
            QueryModel._schemas[key] = schema  # two threads racing here build the same schema twice
        return copy.deepcopy(schema)
