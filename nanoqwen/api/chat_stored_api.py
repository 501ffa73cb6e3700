"""OpenAI's stored chat completions routes: list (`GET /v1/chat/completions`), retrieve, update (its metadata only),
delete, and a completion's messages (`GET /v1/chat/completions/{id}/messages`), over chat_store's ChatStore."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Response
from pydantic import TypeAdapter, ValidationError

from nanoqwen.api.chat_store import ChatStore, StoredCompletion
from nanoqwen.api.encode import encode_text
from nanoqwen.api.errors import APIError
from nanoqwen.api.schemas import Metadata
from nanoqwen.api.stored import check_query, list_page

Json = dict[str, Any]
METADATA_ADAPTER: TypeAdapter[dict[str, str]] = TypeAdapter(Metadata)
COMPLETION = "chat completion"


def _not_found(completion_id: str) -> APIError:
    return APIError(404, f"No chat completion found with id '{completion_id}'.", param="completion_id",
                    code="not_found")


def _metadata_filter(args: Mapping[str, str]) -> dict[str, str]:
    """`metadata[key]=value` pairs, as the openai client encodes `metadata={key: value}` in the query."""
    return {name[len("metadata["):-1]: value for name, value in args.items()
            if name.startswith("metadata[") and name.endswith("]")}


def _json(body: bytes) -> Response:
    return Response(body + b"\n", mimetype="application/json")


class ChatStoredService:
    def __init__(self, store: ChatStore) -> None:
        self.store = store

    def _stored(self, completion_id: str) -> StoredCompletion:
        entry = self.store.get(completion_id)
        if entry is None:
            raise _not_found(completion_id)
        return entry

    def list(self, args: Mapping[str, str]) -> Response:
        """A page of the completions kept, oldest first by default (as OpenAI's), of a `model` and holding every
        `metadata[key]=value` pair asked for."""
        wanted = _metadata_filter(args)
        check_query(args, ("after", "limit", "order", "model", *(f"metadata[{key}]" for key in wanted)))
        model = args.get("model")
        kept = {completion_id: entry for completion_id, entry in self.store.listed()
                if (model is None or entry.model == model) and wanted.items() <= entry.metadata.items()}
        page = list_page([{"id": completion_id} for completion_id in kept], args, "asc", COMPLETION)
        data = b",".join(kept[item["id"]].body for item in page["data"])
        rest = encode_text({key: value for key, value in page.items() if key != "data"}).encode()
        return _json(b'{"object":"list","data":[' + data + b"]," + rest[len(b'{"object":"list",'):])

    def retrieve(self, completion_id: str, args: Mapping[str, str]) -> Response:
        check_query(args, ())
        return _json(self._stored(completion_id).body)

    def update(self, completion_id: str, body: Any) -> Response:
        """Only `metadata` may change (OpenAI's rule): it replaces the completion's; null clears it."""
        if not isinstance(body, dict):
            raise APIError(400, "The body must be a JSON object: {\"metadata\": {...}}")
        if other := sorted(set(body) - {"metadata"}):
            raise APIError(400, f"Only 'metadata' of a stored chat completion can be updated, not '{other[0]}'",
                           param=other[0], code="unsupported_parameter")
        if "metadata" not in body:
            raise APIError(400, "Missing required parameter: 'metadata'", param="metadata",
                           code="missing_required_parameter")
        try:
            metadata = METADATA_ADAPTER.validate_python(body["metadata"] or {}, strict=True)
        except ValidationError as exc:
            raise APIError(400, f"Invalid 'metadata': {exc.errors()[0]['msg']}", param="metadata") from None
        updated = self.store.update(completion_id, metadata)
        if updated is None:
            raise _not_found(completion_id)
        return _json(updated.body)

    def delete(self, completion_id: str) -> Json:
        if not self.store.delete(completion_id):
            raise _not_found(completion_id)
        return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}

    def messages(self, completion_id: str, args: Mapping[str, str]) -> Json:
        """A page of the completion's request messages, oldest first by default (as OpenAI's)."""
        check_query(args, ("after", "limit", "order"))
        return list_page(json.loads(self._stored(completion_id).messages), args, "asc", "message")
