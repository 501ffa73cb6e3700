"""Server settings read from the environment (the engine reads its own, see EngineConfig). Torch-free:
`nanoqwen serve` (nanoqwen/cli.py) shows their defaults."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from nanoqwen.api.hosts import parse_allowed_hosts
from nanoqwen.choices import DEFAULT_MODEL
from nanoqwen.settings import env_setting

# /metrics' series repeat the served name (vLLM's `model_name` label) in each key of prometheus-client's maps, which are
# reserved at a fixed size (nanoqwen.api.metric_maps): at this bound the histograms' map is ~100 KB, under half of it
MAX_SERVED_NAME_CHARS = 128


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "qwen3-0.6b"
    model_name: str = DEFAULT_MODEL  # /health's model_name: the Hub repo id, or the checkpoint directory's name
    hub_id: str | None = DEFAULT_MODEL  # also accepted as `model` (never a local path)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    cors_origins: tuple[str, ...] = ()  # empty = no CORS headers; "*" = any origin
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback listener serves besides local ones (api/hosts.py)
    max_body_bytes: int = 8 << 20
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (else 408)
    send_timeout_s: float = 60.0  # a response's write that makes no progress for this closes the connection (nginx's)
    disconnect_poll_s: float = 0.5  # how often a waiting request checks that its client is there
    # Prompts are templated and tokenised in native threads, in two lanes so that long prompts
    # (seconds each) never hold up short ones; past max_pending in a lane, 503.
    tokenizer_threads: int = 2
    max_pending_prompts: int = 64
    long_prompt_chars: int = 1 << 16  # message text from which a prompt takes the long lane
    long_prompt_threads: int = 1
    max_pending_long_prompts: int = 8
    # Grammars are compiled in a lane of their own (up to ~0.3 s of llguidance's fuel each, deep stacks), so a client
    # sending many costly ones never holds up another's prompt; past max_pending, 503.
    grammar_threads: int = 2
    max_pending_grammars: int = 16

    @classmethod
    def from_env(cls, model: str, env: Mapping[str, str] = os.environ) -> ServerConfig:
        """`model`: the engine's setting (EngineConfig.model, the one reader of NANOQWEN_MODEL)."""
        from nanoqwen.loader import checkpoint_name, hub_repo_id  # here: the loader imports torch, the CLI this module

        origins = tuple(o.strip() for o in (env_setting("cors_origins", env) or "").split(",") if o.strip())
        return cls(
            served_model_name=_served_name(env_setting("served_model_name", env) or cls.served_model_name),
            model_name=checkpoint_name(model),
            hub_id=hub_repo_id(model),
            api_key=_api_key(env_setting("api_key", env)),
            cors_origins=origins,
            allowed_hosts=parse_allowed_hosts(env_setting("allowed_hosts", env)),
            body_timeout_s=_seconds("body_timeout", cls.body_timeout_s, env),
            send_timeout_s=_seconds("send_timeout", cls.send_timeout_s, env),
            grammar_threads=_count("grammar_threads", cls.grammar_threads, env),
            max_pending_grammars=_count("max_pending_grammars", cls.max_pending_grammars, env),
        )

    @property
    def model_names(self) -> tuple[str, ...]:
        """What a request's `model` may name."""
        return (self.served_model_name,) if self.hub_id is None else (self.served_model_name, self.hub_id)

    def accepts_model(self, name: str) -> bool:
        return name in self.model_names


def _served_name(name: str) -> str:
    """Refused at startup where longer than MAX_SERVED_NAME_CHARS as the maps' keys spell it (JSON, non-ASCII
    escaped)."""
    chars = len(json.dumps(name)) - 2
    if chars > MAX_SERVED_NAME_CHARS:
        raise ValueError(f"NANOQWEN_SERVED_MODEL_NAME is {chars} characters long as JSON escapes it: at most "
                         f"{MAX_SERVED_NAME_CHARS} (/metrics repeats it in each series, in maps of a fixed size)")
    return name


def _api_key(key: str | None) -> str | None:
    """Refused at startup where no client could send it: the check strips the header's token, and a header carries
    neither control characters nor (the openai client's) non-ASCII. A key file's newline had made every request a
    401."""
    if key is not None and (key != key.strip() or not (key.isascii() and key.isprintable())):
        raise ValueError("NANOQWEN_API_KEY must be printable ASCII with no whitespace at its ends: no client's "
                         "`Authorization: Bearer <key>` carries another (read from a file with its newline?)")
    return key


def _count(name: str, default: int, env: Mapping[str, str]) -> int:
    """NANOQWEN_<NAME> as a whole number > 0, `default` where unset."""
    raw = env_setting(name, env)
    if raw is None:
        return default
    if not raw.strip().isdecimal() or int(raw) < 1:
        raise ValueError(f"NANOQWEN_{name.upper()}={raw!r} is not a whole number > 0")
    return int(raw)


def _seconds(name: str, default: float, env: Mapping[str, str]) -> float:
    """NANOQWEN_<NAME> as a duration: a number of seconds > 0, `default` where unset."""
    raw = env_setting(name, env)
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        raise ValueError(f"NANOQWEN_{name.upper()}={raw!r} is not a number of seconds > 0")
    return seconds
