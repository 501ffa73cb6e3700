"""JSON Schemas of the shapes grammar_rows' weighing is tested on, shared by its unit tests and the server's."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def closed_object(properties: dict[str, Any]) -> dict[str, Any]:
    """An object of `properties`, all required, no others."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def options_with_chains(options: int, links: int, option: Callable[[int, dict[str, Any]], dict[str, Any]] =
                        lambda j, chain: closed_object({"x": chain})) -> dict[str, Any]:
    """An `anyOf` of `options` options, option(j, a `$ref` to chain j) each (by default `{"x": chain j}`): each chain
    its own `links` links of `anyOf [$ref, integer]`, 2 items a link in the row where its value begins."""
    defs = {f"c{j}_{i}": {"anyOf": [{"$ref": f"#/$defs/c{j}_{i + 1}"}, {"type": "integer"}]}
            for j in range(options) for i in range(links)}
    defs.update({f"c{j}_{links}": {"type": "integer"} for j in range(options)})
    return {"anyOf": [option(j, {"$ref": f"#/$defs/c{j}_0"}) for j in range(options)], "$defs": defs}
