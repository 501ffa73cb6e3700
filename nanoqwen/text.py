"""Token ids -> OpenAI text deltas: incremental UTF-8 detokenisation, stop strings, <think> split.

Per choice the chain is Detokenizer -> StopMatcher -> ReasoningParser (`TextPipeline`). Every
stage is incremental: each token costs work proportional to its own bytes plus the longest stop
string / tag, never to the length of the output so far.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class TokenBytes:
    """id -> raw bytes table for a byte-level BPE fast tokenizer, built once and shared."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        # Here, not at the top: the worker imports this module before its loop serves. loader.load_tokenizer
        # (AutoTokenizer) has imported transformers in the loading thread already; this import finds it loaded.
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        backend = tokenizer.backend_tokenizer
        added = tokenizer.added_tokens_decoder  # id -> AddedToken
        model_size = backend.get_vocab_size(with_added_tokens=False)
        size = max(len(tokenizer), model_size, max(added, default=-1) + 1)
        # Byte-level strings ("Ġthe") map char by char to bytes: translate to the code points
        # 0..255, then latin-1 encodes each as that byte. Ids the model lacks stay empty.
        to_byte = {ord(char): byte for byte, char in bytes_to_unicode().items()}
        self._bytes = [
            (backend.id_to_token(i) or "").translate(to_byte).encode("latin-1")
            for i in range(model_size)
        ]
        self._bytes += [b""] * (size - model_size)
        for token_id, token in added.items():
            self._bytes[token_id] = token.content.encode("utf-8")
        # The backend skips added tokens flagged special; all_special_ids are the named ones.
        self._special = frozenset(tokenizer.all_special_ids) | frozenset(
            token_id for token_id, token in added.items() if token.special
        )

    def bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token; ids past the tokenizer (padded embedding rows) are empty."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def piece(self, token_id: int) -> str:
        """Readable token string for logprobs (a partial UTF-8 character shows as U+FFFD)."""
        return self.bytes(token_id).decode("utf-8", errors="replace")


def _sequence_length(lead: int) -> int:
    """Bytes in a UTF-8 sequence starting with `lead`; 0 for bytes that cannot start one."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


# Second-byte ranges that exclude overlongs, surrogates and code points above U+10FFFF.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _incomplete_tail(data: bytes) -> int:
    """Length of the trailing bytes of `data` that are a proper prefix of a valid character."""
    for k in range(1, min(3, len(data)) + 1):
        lead = data[-k]
        if not 0x80 <= lead <= 0xBF:  # the last byte that is not a continuation byte
            if k >= _sequence_length(lead):
                return 0
            low, high = _SECOND_BYTE.get(lead, (0x80, 0xBF))
            return k if k == 1 or low <= data[-k + 1] <= high else 0
    return 0


class Detokenizer:
    """Streams token ids into text without ever splitting a UTF-8 character.

    Only a trailing prefix that can still complete a character is held; everything before it is
    decoded with `errors="replace"`. The split always falls on a lead byte, where a one-shot decode
    starts a new sequence too, so invalid bytes become the same U+FFFDs, and as soon as they are
    known invalid (CPython's incremental decoder holds the surrogate prefix ED A0 a byte longer).
    Skipped special tokens drop out of the byte stream, as in the fast tokenizer's ByteLevel
    decoder, so the deltas concatenate to `tokenizer.decode(ids, skip_special_tokens=...)`.
    """

    def __init__(self, token_bytes: TokenBytes, skip_special_tokens: bool = True) -> None:
        self._token_bytes = token_bytes
        self._skip_special_tokens = skip_special_tokens
        self._pending = b""  # at most 3 bytes

    def add(self, token_id: int) -> str:
        if self._skip_special_tokens and self._token_bytes.is_special(token_id):
            return ""
        data = self._pending + self._token_bytes.bytes(token_id)
        ready = len(data) - _incomplete_tail(data)
        self._pending = data[ready:]
        return data[:ready].decode("utf-8", errors="replace")

    def flush(self) -> str:
        pending, self._pending = self._pending, b""
        return pending.decode("utf-8", errors="replace")


def _partial_suffix(text: str, needles: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`."""
    longest = 0
    for needle in needles:
        start = max(0, len(text) - len(needle) + 1)
        # Candidates start where the needle's first char occurs; the first that fits is longest.
        while (start := text.find(needle[0], start)) >= 0:
            if needle.startswith(text[start:]):
                longest = max(longest, len(text) - start)
                break
            start += 1
    return longest


class StopMatcher:
    """Cuts the stream before the first stop string to complete.

    "First to complete" (earliest end, then earliest start) makes the result independent of how
    the text is split into deltas, also for overlapping stops such as ["abcd", "bc"]. Text added
    with `check=False` (vLLM's min_tokens) is held as usual but no stop string ends in it: one that
    completes later may still start in it.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""  # tail that may still grow into a stop string
        self._stopped = False

    @property
    def holds(self) -> bool:
        """Whether text may be held back, and cut, for a stop string."""
        return bool(self._stops)

    def add(self, text: str, check: bool = True) -> tuple[str, bool]:
        """Returns (text safe to release, stopped); after a stop everything else is dropped."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        new = len(text)
        text = self._held + text
        # a match must end in the new text: the held text may hold a stop ignored while not checking
        hits = [(i + len(stop), i) for stop in self._stops
                if check and (i := text.find(stop, max(0, len(text) - new - len(stop) + 1))) >= 0]
        if hits:
            self._stopped, self._held = True, ""
            return text[: min(hits)[1]], True
        keep = _partial_suffix(text, self._stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class ReasoningParser:
    """Splits Qwen3 output into (reasoning, content) like vLLM's qwen3 parser.

    Output that starts with <think> is reasoning up to </think> and content after it; the tags are
    dropped and the text between them is kept verbatim (no newline stripping, as vLLM does, so
    streamed deltas concatenate to the non-streamed fields). Output that does not start with
    <think> is all content, except when the prompt itself ends inside an open think block
    (`think_in_prompt=True`): then everything before </think> is reasoning. Reasoning that never
    closes (length cut-off) stays reasoning. Tags split across deltas are held until resolved.
    """

    def __init__(self, think_in_prompt: bool = False) -> None:
        self._state = "start"  # -> "reasoning" -> "content"
        self._untagged_state = "reasoning" if think_in_prompt else "content"
        self._held = ""

    def add(self, text: str) -> tuple[str, str]:
        """Returns (reasoning_delta, content_delta)."""
        if self._state == "content":
            return "", text
        text = self._held + text
        self._held = ""
        if self._state == "start":
            if text.startswith(THINK_OPEN):
                self._state = "reasoning"
                text = text[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(text):
                self._held = text
                return "", ""
            else:
                self._state = self._untagged_state
                if self._state == "content":
                    return "", text
        end = text.find(THINK_CLOSE)
        if end >= 0:
            self._state = "content"
            return text[:end], text[end + len(THINK_CLOSE) :]
        keep = _partial_suffix(text, [THINK_CLOSE])
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        state = self._untagged_state if self._state == "start" else self._state
        return (held, "") if state == "reasoning" else ("", held)


class TextPipeline:
    """One choice's token ids -> (reasoning, content) deltas; stop strings see the raw text."""

    def __init__(
        self,
        token_bytes: TokenBytes,
        stops: list[str],
        skip_special_tokens: bool = True,
        split_reasoning: bool = True,
        think_in_prompt: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._detokenizer = Detokenizer(token_bytes, skip_special_tokens)
        self._stops = StopMatcher(stops)
        self._reasoning = ReasoningParser(think_in_prompt) if split_reasoning else None
        self._unchecked = min_tokens  # tokens whose text no stop string may end in (vLLM's StopChecker)
        self.offset = 0  # characters of decoded text so far: where the next token's text starts
        self.released = 0  # of them, those let through (the rest held for a stop string, or cut by one)

    @property
    def holds(self) -> bool:
        """Whether text may be held back, and cut, for a stop string (StopMatcher's)."""
        return self._stops.holds

    def add(self, token_id: int) -> tuple[str, str, bool]:
        """Returns (reasoning_delta, content_delta, stopped_by_string); a stop flushes all."""
        check = self._unchecked <= 0
        self._unchecked -= 1
        decoded = self._detokenizer.add(token_id)
        text, stopped = self._stops.add(decoded, check)
        self.offset += len(decoded)
        self.released += len(text)
        reasoning, content = self._split(text, final=stopped)
        return reasoning, content, stopped

    def finish(self) -> tuple[str, str]:
        """Flushes held text when generation ends by EOS or length (not after a stop string)."""
        decoded = self._detokenizer.flush()
        text, stopped = self._stops.add(decoded, self._unchecked <= 0)
        if not stopped:
            text += self._stops.flush()
        self.offset += len(decoded)
        self.released += len(text)
        return self._split(text, final=True)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self._reasoning is None:
            return "", text
        reasoning, content = self._reasoning.add(text)
        if final:
            held_reasoning, held_content = self._reasoning.flush()
            reasoning, content = reasoning + held_reasoning, content + held_content
        return reasoning, content
