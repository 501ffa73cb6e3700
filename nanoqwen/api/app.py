"""The Flask app: routes, API-key check, CORS and OpenAI-style error responses."""
from __future__ import annotations

import hmac
import logging
import re
import time
from importlib.metadata import version
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, NotFound

from nanoqwen.access_log import escaped
from nanoqwen.api import request_id
from nanoqwen.api.body import ParsedBody, close_if_unread, read_body
from nanoqwen.api.chat import ChatService
from nanoqwen.api.chat_stored_api import ChatStoredService
from nanoqwen.api.completions import CompletionService
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError, generation_error
from nanoqwen.api.hosts import HostGuard
from nanoqwen.api.metrics import NAME_FILTER, ServerStats
from nanoqwen.api.openapi import openapi_document
from nanoqwen.api.responses_api import ResponsesService
from nanoqwen.api.serving import MODEL_LOADING, Serving, unavailable
from nanoqwen.api.shared_stats import SharedStats
from nanoqwen.api.stored import check_query
from nanoqwen.api.tokenize import TokenizeService
from nanoqwen.engine import Engine

log = logging.getLogger(__name__)
OWNED_BY = "nano-qwen3-serving"
DEFAULT_ALLOWED_HEADERS = "Authorization, Content-Type"
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
PREFLIGHT_MAX_AGE_S = "600"


def _error_response(error: APIError) -> Response:
    body = error.body()
    # A message may quote a value from the request: never let it fail to encode.
    body["error"]["message"] = error.message.encode("utf-8", "replace").decode("utf-8")
    response = jsonify(body)
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


MODEL_ROUTE = "/v1/models/"


def _request_path() -> str:
    """The path as sent: werkzeug's `request.path` drops a leading run of slashes."""
    path_info = request.environ.get("PATH_INFO", "")
    return "/" * (len(path_info) - len(path_info.lstrip("/"))) + request.path.lstrip("/")


def _route_hint(path: str) -> str:
    """What a path with an empty segment (`/v1//chat/completions`: a client's base URL ending in `/`) or a trailing
    slash likely meant, where that is a route: OpenAI and vLLM answer such a path 404, without a redirect."""
    canonical = "/" + "/".join(part for part in path.split("/") if part)
    if canonical == path or not current_app.url_map.bind("localhost").test(canonical, request.method):
        return ""
    return f" (did you mean {canonical}? Check the client's base URL for a trailing slash.)"


def _http_error(exc: HTTPException) -> APIError:
    if exc.code == 404:
        path = _request_path()
        return APIError(404, f"Unknown endpoint: {request.method} {path}{_route_hint(path)}", code="not_found")
    if exc.code == 405:
        allowed = ", ".join(sorted(getattr(exc, "valid_methods", None) or []))
        return APIError(405, f"Method {request.method} is not allowed on {request.path}",
                        code="method_not_allowed", headers={"Allow": allowed} if allowed else None)
    if exc.code == 413:
        return APIError(413, f"The request body is too large (limit {request.max_content_length} bytes)",
                        code="request_too_large")
    return APIError(exc.code or 500, exc.description or exc.name,
                    type="server_error" if (exc.code or 500) >= 500 else "invalid_request_error")


def create_app(engine: Engine, config: ServerConfig) -> Flask:
    app = Flask("nanoqwen", static_folder=None)  # Flask's /static/<path> route: it served no file, OPTIONS a 200
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    stats = ServerStats(lambda: engine.stats() if engine.ready else None, SharedStats.from_env(),
                        config.served_model_name)
    app.extensions["nanoqwen.stats"] = stats  # the gunicorn worker publishes it periodically
    app.extensions["nanoqwen.config"] = config  # the worker's response writes use its send_timeout_s
    serving = Serving(engine, config, stats)
    chat = ChatService(serving)
    stored_chat = ChatStoredService(chat.store, serving.off_loop_if)
    completions = CompletionService(serving)
    responses = ResponsesService(chat)
    tokens = TokenizeService(serving)
    started = time.time()
    request_id.install(app)
    hosts = HostGuard(config.allowed_hosts)

    @app.before_request
    def check_host() -> None:
        """First: before the body is read, and before the API key or CORS answer."""
        hosts.check(request.environ)

    @app.before_request
    def answer_targets_naming_no_path() -> Response | None:
        """`OPTIONS *` asks about the server itself (RFC 9110 9.3.7): its methods, in Allow; CONNECT's `host:port` asks
        for a tunnel, which a proxy opens (9.3.6): a 405, as nginx's, the target allowing no method. Each was a 404
        naming `*` or the port (gunicorn reads `host:80` as the path `80`)."""
        path = request.environ.get("PATH_INFO", "")
        if path.startswith("/"):
            return None
        if request.method == "OPTIONS" and path == "*":
            methods = {method for rule in app.url_map.iter_rules() for method in rule.methods or ()}
            answer = Response(headers={"Allow": ", ".join(sorted(methods))})
            del answer.headers["Content-Type"]  # no content (RFC 9110 9.3.7: its Content-Length is 0)
            return answer
        if request.method == "CONNECT":
            raise APIError(405, "CONNECT asks for a tunnel, which a proxy opens (RFC 9110 9.3.6): this server is none",
                           code="method_not_allowed", headers={"Allow": ""})
        return None

    @app.before_request
    def refuse_empty_segments() -> None:
        """`//` anywhere in a path is a 404, as OpenAI's and vLLM's, where werkzeug would answer a redirect (308,
        an HTML page) or, for a leading one, serve the route; but a model id in /v1/models/ may hold any slashes (the
        client's `models.retrieve("/a/local/dir")` asks for /v1/models//a/local/dir)."""
        path = _request_path()
        if "//" in (MODEL_ROUTE if path.startswith(MODEL_ROUTE) else path):
            raise NotFound()

    @app.before_request
    def check_api_key() -> None:
        if config.api_key is None or not request.path.startswith("/v1/") or request.method == "OPTIONS":
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # RFC 6750 3: a 401 names it

    # The endpoints that check their query themselves (the stored items' services), and /health, which answers any
    # (no query changes its answer, and a 400 would take a healthy server out of a balancer's rotation for a probe's
    # cache-busting `?ts=`); every other route reads none but those listed (OpenAI's list and retrieve models take
    # none): a parameter is refused by name, not ignored (`POST /v1/chat/completions?stream=true` was answered whole,
    # the parameter ignored), before the body is read. OPTIONS is not checked: a CORS preflight carries the actual
    # request's query, whose own answer (a 400 the browser can read) says what is wrong.
    own_query = {"list_chat_completions", "retrieve_chat_completion", "update_chat_completion",
                 "delete_chat_completion", "chat_completion_messages", "retrieve_response", "cancel_response",
                 "delete_response", "response_input_items", "health"}
    query_read = {"metrics": (NAME_FILTER,)}  # each repeatable

    @app.before_request
    def refuse_an_unread_query() -> None:
        if request.method == "OPTIONS" or request.endpoint is None or request.endpoint in own_query:
            return
        known = query_read.get(request.endpoint, ())
        check_query(request.args, known, known)

    @app.after_request
    def close_after_an_unread_body(response: Response) -> Response:
        close_if_unread(request)
        return response

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and ("*" in config.cors_origins or origin in config.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in config.cors_origins else origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.vary.add("Origin")
            # Clients add their own headers (openai-node sends x-stainless-*): allow what the
            # preflight asks for rather than a fixed list.
            requested = request.headers.get("Access-Control-Request-Headers", "").strip()
            if request.method == "OPTIONS" and HEADER_LIST.fullmatch(requested):
                response.headers["Access-Control-Allow-Headers"] = requested
                response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE_S
                response.vary.add("Access-Control-Request-Headers")
            else:
                response.headers["Access-Control-Allow-Headers"] = DEFAULT_ALLOWED_HEADERS
        return response

    def json_body() -> ParsedBody:
        """The request's JSON body and the values it leaves the JSON in its strings, read within body_timeout_s and
        decoded (else a 400, 408 or 413)."""
        return serving.parse_body(*read_body(request, config.body_timeout_s))

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response | dict[str, Any]:
        return chat.handle(*json_body(), request.environ)

    @app.get("/v1/chat/completions")
    def list_chat_completions() -> Response:
        return stored_chat.list(request.args)

    @app.get("/v1/chat/completions/<completion_id>")
    def retrieve_chat_completion(completion_id: str) -> Response:
        return stored_chat.retrieve(completion_id, request.args)

    @app.post("/v1/chat/completions/<completion_id>")
    def update_chat_completion(completion_id: str) -> Response:
        return stored_chat.update(completion_id, request.args, *json_body())

    @app.delete("/v1/chat/completions/<completion_id>")
    def delete_chat_completion(completion_id: str) -> dict[str, Any]:
        return stored_chat.delete(completion_id, request.args)

    @app.get("/v1/chat/completions/<completion_id>/messages")
    def chat_completion_messages(completion_id: str) -> Response:
        return stored_chat.messages(completion_id, request.args)

    @app.post("/v1/completions")
    def text_completions() -> Response | dict[str, Any]:
        return completions.handle(*json_body(), request.environ)

    @app.post("/v1/responses")
    def create_response() -> Response | dict[str, Any]:
        return responses.create(*json_body(), request.environ)

    @app.post("/v1/responses/input_tokens")
    def count_input_tokens() -> dict[str, Any]:
        return responses.count(*json_body())

    @app.get("/v1/responses/<response_id>")
    def retrieve_response(response_id: str) -> dict[str, Any]:
        return responses.retrieve(response_id, request.args, request.environ)

    @app.post("/v1/responses/<response_id>/cancel")
    def cancel_response(response_id: str) -> Response:
        return responses.cancel(response_id, request.args)

    @app.delete("/v1/responses/<response_id>")
    def delete_response(response_id: str) -> dict[str, Any]:
        return responses.delete(response_id, request.args)

    @app.get("/v1/responses/<response_id>/input_items")
    def response_input_items(response_id: str) -> Response:
        return responses.input_items(response_id, request.args)

    @app.post("/tokenize")
    def tokenize() -> dict[str, Any]:
        return tokens.tokenize(*json_body())

    @app.post("/detokenize")
    def detokenize() -> dict[str, Any]:
        return tokens.detokenize(*json_body())

    def model_card() -> dict[str, Any]:
        return {"id": config.served_model_name, "object": "model", "created": int(started), "owned_by": OWNED_BY}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get(f"{MODEL_ROUTE}<path:model>")
    def retrieve_model(model: str) -> dict[str, Any]:
        if not config.accepts_model(model):
            raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/openapi.json")
    def openapi() -> dict[str, Any]:
        return openapi_document("nanoqwen", version("nanoqwen"), config.model_names)

    @app.get("/health")
    def health() -> tuple[dict[str, Any], int] | dict[str, Any]:
        uptime = time.time() - started
        if (error := unavailable(engine)) is not None:
            status = "loading" if error.code == MODEL_LOADING else "error"
            body = {"status": status, "uptime": uptime, "model_info": {"model_name": config.model_name}}
            if status == "error":  # the reason (which may name local paths) is in the log
                body["error"] = "the model failed to load"
            return body, 503
        info = serving.info
        model_info = {"model_name": config.model_name, "served_model_name": config.served_model_name}
        keys = ("device", "dtype", "quant", "kernels", "float_gemv", "graph", "cpu_replay", "max_batch",
                "max_model_len", "speculative")
        model_info |= {key: info[key] for key in keys}
        model_info["sampling_defaults"] = engine.sampling_defaults  # from generation_config.json
        return {"status": "healthy", "uptime": uptime, "model_info": model_info}

    @app.get("/stats")
    def serving_stats() -> dict[str, Any]:
        return stats.report()

    @app.get("/metrics")
    def metrics() -> Response:
        """`name[]` (repeatable) keeps the samples of those names, prometheus-client's own exposition's filter."""
        # a blank one dropped, none left no filter: prometheus-client's exposition parses it so (parse_qs)
        names = [name for name in request.args.getlist(NAME_FILTER) if name] or None
        return Response(stats.prometheus(names), content_type=CONTENT_TYPE_LATEST)

    @app.errorhandler(APIError)
    def api_error(exc: APIError) -> Response:
        return _error_response(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _error_response(_http_error(exc))

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, escaped(request.path))  # a path's CR LF
        return _error_response(generation_error("Internal server error"))  # a stream's failure says the same

    return app
