"""The compiled grammars kept for requests that send the same again, bounded by count and by the bytes they hold, the
least recently used dropped first.

llguidance reports no size for a matcher, and its text is no measure of one (the regex `a{30000}`, 10 characters,
holds 11 MB once its first mask has built the lexer; a 4,900-property object 15 MB: profiles/RESULTS.md, lane
cache43). A grammar is charged what malloc handed out across its compile and first mask (heap_used before and after,
on the compiling thread: llguidance's Rust allocates through the C library's malloc). malloc's count is the process's:
a compile that runs beside another is charged the other's allocations too (two 15 MB compiles at once: ~26-30 MB
each), erring high; the grammars the cache let go meanwhile (the other compile's eviction) are added back (`released`),
else an 11 MB grammar compiled beside one was charged 0 (profiles/RESULTS.md, the lead's forty-third section); what
requests free meanwhile errs it low. Its text, made before, is added. Where the C library has no mallinfo2 (not glibc)
the text alone is charged, and the count is what bounds the cache. What the grammar's lexer, shared by its requests'
copies, grows after it is cached (`[ab]*a[ab]{20}`, charged 0.1 MB, grew 45.6 MB in 5,200 tokens sampled at random:
profiles/RESULTS.md, lane tidy44) no thread's heap delta tells; a grammar's size grows instead with the tokens its
copies consumed (grammar.WEAR_BYTES), and the cache weighs its grammars anew at each lookup and keep (reweigh)."""
from __future__ import annotations

import collections
import ctypes
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        call = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc (or one older than 2.33)
        return None
    call.restype = _Mallinfo2
    return call


_MALLINFO2 = _mallinfo2()


def mallinfo() -> _Mallinfo2 | None:
    """glibc's malloc figures now (profiles/gil_watch_conf.py's memory watch reads its free bytes too); None where
    unknown."""
    return None if _MALLINFO2 is None else _MALLINFO2()


def heap_used() -> int | None:
    """The bytes malloc has handed out and not had back (its arenas' and its own mmaps'); None where unknown."""
    info = mallinfo()
    return None if info is None else info.uordblks + info.hblkhd


def charged(before: int | None, after: int | None, text: str, released: int) -> int:
    """The bytes a grammar of `text` is charged, compiled while heap_used() went from `before` to `after` and the cache
    let go of grammars charged `released` in all: those, and its text (made before, held beside it)."""
    return len(text) + (0 if before is None or after is None else max(after - before + released, 0))


class Sized(Protocol):
    @property
    def size(self) -> int: ...  # what it is charged now: its compile's and its wear's

    @property
    def compiled(self) -> int: ...  # what its compile and first mask took, measured: what letting it go gives back


# A grammar's wear (grammar.WEAR_BYTES a token, up to 150 MB) counted at most a quarter of the budget past its compile:
# the worst shape's rate charged to every grammar, two much-used ones (a typical lexer levels off at 0.3-1.3 MB) filled
# the default 256 MiB and dropped each other at each lookup; so up to 4 stay, and what worn grammars hold is bounded
# by 4 x 150 MB past the budget at worst, where before this charge 128 grammars could hold 150 MB each
WORN_SHARE = 4

K = TypeVar("K", bound=Hashable)
G = TypeVar("G", bound=Sized)


@dataclass
class GrammarCache(Generic[K, G]):
    """Grammars by key, oldest (least recently used) first; one grammar may be under several keys (what different
    requests sent for it), its bytes counted once. Not locked: its owner's lock covers it."""

    max_entries: int
    max_bytes: int
    entries: collections.OrderedDict[K, G] = field(default_factory=collections.OrderedDict, init=False)
    bytes: int = field(default=0, init=False)
    released: int = field(default=0, init=False)  # the compiled bytes of every grammar it let go of, all told
    # by id(grammar): its keys here, and the bytes it is counted for in `bytes` (its size when last weighed)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict, init=False, repr=False)

    def get(self, key: K) -> G | None:
        """The grammar under `key`, now the most recently used; None on a miss."""
        grammar = self.entries.get(key)
        if grammar is not None:
            self.entries.move_to_end(key)
        return grammar

    @property
    def grammars(self) -> int:
        """The distinct grammars kept (one may be under several keys)."""
        return len(self._held)

    def put(self, key: K, grammar: G) -> list[G]:
        """`grammar` under `key` as the most recently used; the oldest keys go until both bounds hold, or until it is
        the only one (a grammar past max_bytes alone is kept: it serves its request sent again). What went: for the
        caller to let go of after its lock (freeing a big grammar takes ~18 ms)."""
        if self.entries.get(key) is grammar:  # kept again (two requests' compiles of one): let go of nothing
            self.entries.move_to_end(key)
            return []
        gone = [self.pop(key)]
        self.entries[key] = grammar
        self._keyed(grammar, 1)
        return [went for went in gone if went is not None] + self.reweigh()

    def reweigh(self, drop: bool = True) -> list[G]:
        """Each grammar counted at its size now (which grows as its requests wear its lexer), then (`drop`) the oldest
        keys dropped until both bounds hold, or until one is left (the most recently used); what went, as put's."""
        for grammar in self.entries.values():
            keys, counted = self._held[id(grammar)]
            size = self.counted(grammar)  # read once: the steps' masks grow it meanwhile
            self._held[id(grammar)] = keys, size
            self.bytes += size - counted
        gone: list[G | None] = []
        while drop and len(self.entries) > 1 and (len(self.entries) > self.max_entries or self.bytes > self.max_bytes):
            gone.append(self.pop(next(iter(self.entries))))
        return [went for went in gone if went is not None]

    def counted(self, grammar: G) -> int:
        """The bytes `grammar` is counted for: its size, its wear's part at most a WORN_SHARE of the budget."""
        return min(grammar.size, grammar.compiled + self.max_bytes // WORN_SHARE)

    def pop(self, key: K) -> G | None:
        grammar = self.entries.pop(key, None)
        if grammar is not None:
            self._keyed(grammar, -1)
        return grammar

    def _keyed(self, grammar: G, keys: int) -> None:
        """One key more (1) or fewer (-1) for `grammar`: its bytes counted while any key holds it (as last weighed)."""
        held, counted = self._held.get(id(grammar), (0, self.counted(grammar)))
        if held + keys:  # assigned, not popped and put back: cache_stats counts the grammars without the lock
            self._held[id(grammar)] = held + keys, counted
        else:
            del self._held[id(grammar)]
        if not held or not held + keys:
            self.bytes += keys * counted
            # not its wear: an estimate, never measured on the heap, that a compile beside this would be charged
            self.released += grammar.compiled if keys < 0 else 0
