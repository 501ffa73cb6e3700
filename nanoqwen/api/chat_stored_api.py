"""OpenAI's stored chat completions routes: list (`GET /v1/chat/completions`), retrieve, update (its metadata only),
delete, and a completion's messages (`GET /v1/chat/completions/{id}/messages`), over chat_store's ChatStore."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Response

from nanoqwen.api.chat_store import ChatStore, StoredCompletion
from nanoqwen.api.encode import encode_text
from nanoqwen.api.errors import APIError
from nanoqwen.api.schemas import (
    METADATA_KEY_CHARS,
    METADATA_KEYS,
    METADATA_VALUE_CHARS,
    Metadata,
    Strict,
    validate_body,
)
from nanoqwen.api.serving import lane
from nanoqwen.api.stored import check_query, encoded_page, page_after
from nanoqwen.api.strict_json import Budget

Json = dict[str, Any]
COMPLETION = "chat completion"


class ChatCompletionUpdateRequest(Strict):
    """`POST /v1/chat/completions/{id}`: only `metadata` may change (OpenAI's rule), replaced whole (null: cleared);
    any other field is a 400 naming it."""

    metadata: Metadata | None


def _not_found(completion_id: str) -> APIError:
    return APIError(404, f"No chat completion found with id '{completion_id}'.", param="completion_id",
                    code="not_found")


def _metadata_filter(args: Mapping[str, str]) -> dict[str, str]:
    """`metadata[key]=value` pairs, as the openai client encodes `metadata={key: value}` in the query; a 400 naming
    the parameter for one no metadata could hold (OpenAI's rules: 16 pairs, keys of 64 characters at most, values of
    512) or a nested one (`metadata[k][x]`), which would match nothing."""
    wanted = {}
    for name, value in args.items():
        if not (name.startswith("metadata[") and name.endswith("]")):
            continue
        key = name[len("metadata["):-1]
        if "[" in key or "]" in key:
            raise APIError(400, f"Invalid parameter '{name}': a metadata filter is `metadata[key]=value`", param=name)
        if len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
            raise APIError(400, f"Invalid parameter '{name}': metadata keys are at most {METADATA_KEY_CHARS} "
                           f"characters and values at most {METADATA_VALUE_CHARS}", param=name)
        wanted[key] = value
    if len(wanted) > METADATA_KEYS:
        raise APIError(400, f"Invalid parameter 'metadata': at most {METADATA_KEYS} pairs", param="metadata")
    return wanted


def _json(body: bytes) -> Response:
    return Response(body + b"\n", mimetype="application/json")


class ChatStoredService:
    def __init__(self, store: ChatStore, off_loop_if: Callable[..., Any]) -> None:
        self.store = store
        self.off_loop_if = off_loop_if  # Serving's

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
        model, after = args.get("model"), args.get("after")
        cursor = None if after is None else self.store.place(after)
        if after is not None and cursor is None:
            raise APIError(400, f"Invalid value for 'after': no {COMPLETION} '{after}'", param="after")
        kept = {completion_id: entry for completion_id, entry in self.store.listed()
                if (model is None or entry.model == model) and wanted.items() <= entry.metadata.items()}
        page = page_after([(entry.place, {"id": completion_id}) for completion_id, entry in kept.items()], args,
                          cursor, "asc")
        data = b",".join(kept[item["id"]].body for item in page["data"])
        rest = encode_text({key: value for key, value in page.items() if key != "data"}).encode()
        return _json(b'{"object":"list","data":[' + data + b"]," + rest[len(b'{"object":"list",'):])

    def retrieve(self, completion_id: str, args: Mapping[str, str]) -> Response:
        check_query(args, ())
        return _json(self._stored(completion_id).body)

    def update(self, completion_id: str, args: Mapping[str, str], body: Any, budget: Budget) -> Response:
        check_query(args, ())
        req = validate_body(ChatCompletionUpdateRequest, body, budget)
        updated = self.store.update(completion_id, req.metadata or {})
        if updated is None:
            raise _not_found(completion_id)
        return _json(updated.body)

    def delete(self, completion_id: str, args: Mapping[str, str]) -> Json:
        check_query(args, ())
        if not self.store.delete(completion_id):
            raise _not_found(completion_id)
        return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}

    def messages(self, completion_id: str, args: Mapping[str, str]) -> Response:
        """A page of the completion's request messages, oldest first by default (as OpenAI's): parsed and encoded off
        the loop where they are large (15 MiB held it ~0.1 s)."""
        check_query(args, ("after", "limit", "order"))
        messages = self._stored(completion_id).messages
        return _json(self.off_loop_if(lane(chars=len(messages)), encoded_page, messages, args, "asc", "message"))
