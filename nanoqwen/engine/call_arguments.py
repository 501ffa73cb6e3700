"""A function call's arguments are a JSON object (Hermes' `"arguments": {...}`, OpenAI's): the one reading of a tool's
`parameters` root that the API's check (a root typed otherwise is OpenAI's 400) and the calls' grammar share."""
from __future__ import annotations

import itertools
import json
from typing import Any

from nanoqwen.engine.schema_keywords import local_target

# a root `$ref` chain followed this far (a loop, `{"$ref": "#"}`, ends here): what lies past it is llguidance's to read
MAX_ROOT_LINKS = 32
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def root_chain(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The root and the schema objects its chain of JSON pointers (`$ref`s `#`, `#/$defs/A`) leads to, in order, as
    far as they are objects of `schema`: an anchor, another URI, a target with an `$id` of its own (its `$ref`s resolve
    in its own resource) or MAX_ROOT_LINKS ends it."""
    chain = [schema]
    while len(chain) <= MAX_ROOT_LINKS and isinstance(ref := chain[-1].get("$ref"), str) and ref.startswith("#"):
        if len(chain) > 1 and "$id" in chain[-1]:
            break
        target = local_target(ref, schema)
        if target is None:
            break
        chain.append(target)
    return chain


def call_arguments(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The schema a call's arguments follow: the tool's `parameters`, held to an object where neither the root nor a
    schema its `$ref` chain leads to (root_chain) has a type (`{"anyOf": [{"type": "string"}, ...]}` let a forced call's
    arguments be a string, no call), or none (the empty object). A root `$ref` keeps no key beside it: llguidance
    refuses one (`type`, `allOf`) beside a `$ref` that a cycle runs through back to `#` (`{"$ref": "#/$defs/A"}`, A's
    property `{"$ref": "#"}`), so the root's `$ref` leads to a new `$defs` entry that holds the object type and, in
    its `allOf`, the `$ref` sent (a `$defs` that is no object: the type beside it, llguidance's 400 where it cycles)."""
    if not parameters:
        return NO_ARGUMENTS
    if any("type" in node for node in root_chain(parameters)):
        return parameters
    defs = parameters.get("$defs", {})
    if "$ref" not in parameters or not isinstance(defs, dict):
        return {"type": "object", **parameters}
    sent = json.dumps(parameters)  # a name no `$ref` sent reaches: a dangling one stays llguidance's 400
    name = next(name for name in (f"arguments{'_' * i}" for i in itertools.count())
                if name not in defs and f'/{name}"' not in sent and f"/{name}/" not in sent)
    held = {"type": "object", "allOf": [{"$ref": parameters["$ref"]}]}
    return {**parameters, "$ref": f"#/$defs/{name}", "$defs": {**defs, name: held}}
