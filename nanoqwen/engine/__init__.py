from nanoqwen.engine.engine import Engine, QueueFullError, ShuttingDownError
from nanoqwen.engine.request import Event, SamplingParams, Usage
from nanoqwen.engine.stream import EventStream
from nanoqwen.settings import EngineConfig

__all__ = ["Engine", "EngineConfig", "Event", "EventStream", "QueueFullError", "SamplingParams", "ShuttingDownError",
           "Usage"]
