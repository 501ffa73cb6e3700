"""gunicorn settings for tests (`-c tests/gunicorn_collections.py`): nanoqwen's, with a worker that logs, on stderr (in
the server's log), whether its imports before it serves took transformers in (`imported transformers: True`), and each
full collection that starts while the model loads with how many objects were frozen out of its walk then
(`load collection: frozen N`), and each that starts once it serves while a grammar is made in the grammars' pool
(`grammar collection: N objects` in generation 2; the first young one, `grammar young collection`). Given
by the environment: a test process must not import this file (nanoqwen.gunicorn_conf makes the metrics' run
directory)."""
import gc
import sys

from nanoqwen.gunicorn_conf import *  # noqa: F401,F403


def post_worker_init(_worker: object) -> None:
    from nanoqwen.wsgi import engine

    print(f"imported transformers: {'transformers' in sys.modules}", file=sys.stderr, flush=True)

    young: list[bool] = []  # a young collection seen in a grammar job: the frames it looks for are there

    def logged(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2 and not engine.ready:
            print(f"load collection: frozen {gc.get_freeze_count()}", file=sys.stderr, flush=True)
        elif phase == "start" and engine.ready and _making_a_grammar():
            if info["generation"] == 2:
                print(f"grammar collection: {len(gc.get_objects(2))} objects", file=sys.stderr, flush=True)
            elif not young:
                young.append(True)
                print("grammar young collection", file=sys.stderr, flush=True)

    gc.callbacks.append(logged)


def _making_a_grammar() -> bool:
    """Whether this thread is in a grammars' pool job (nanoqwen/api/structured.py's _made)."""
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "_made" and frame.f_code.co_filename.endswith(
            "structured.py")):
        frame = frame.f_back
    return frame is not None
