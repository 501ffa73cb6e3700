"""Server settings read from the environment (the engine reads its own, see EngineConfig)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "qwen3-0.6b"
    model_aliases: tuple[str, ...] = (DEFAULT_MODEL,)  # other names a request may use
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    cors_origins: tuple[str, ...] = ()  # empty = no CORS headers; "*" = any origin
    max_body_bytes: int = 8 << 20
    disconnect_poll_s: float = 0.5  # how often a waiting request checks that its client is there

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServerConfig:
        origins = tuple(o.strip() for o in env.get("NANOQWEN_CORS_ORIGINS", "").split(",") if o.strip())
        return cls(
            served_model_name=env.get("NANOQWEN_SERVED_MODEL_NAME", "") or "qwen3-0.6b",
            model_aliases=(env.get("NANOQWEN_MODEL", "") or DEFAULT_MODEL,),
            api_key=env.get("NANOQWEN_API_KEY") or None,
            cors_origins=origins,
        )

    def accepts_model(self, name: str) -> bool:
        return name == self.served_model_name or name in self.model_aliases
