"""nanoqwen.text against a real Qwen3-id tokenizer: streamed deltas must equal one-shot decoding."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from checkpoints import END_THINK_ID, ENDOFTEXT_ID, IM_END_ID, THINK_ID, TOKEN_IDS, write_tokenizer
from nanoqwen.text import Detokenizer, ReasoningParser, StopMatcher, TextPipeline, TokenBytes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def token_bytes(tokenizer) -> TokenBytes:
    return TokenBytes(tokenizer)


@pytest.fixture(scope="module")
def byte_ids(tokenizer) -> list[int]:
    """byte value -> id of the single-byte token."""
    byte_to_char = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in range(256)])


def as_byte_tokens(byte_ids: list[int], text: str) -> list[int]:
    return [byte_ids[b] for b in text.encode("utf-8")]


# Every proper prefix of a valid UTF-8 sequence, built independently of the decoder under test.
# Steps of 64 code points keep every distinct prefix (the last byte carries the low 6 bits).
UTF8_PREFIXES = frozenset(
    chr(cp).encode("utf-8")[:k]
    for start, stop in ((0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000))
    for cp in range(start, stop, 64)
    for k in range(1, len(chr(cp).encode("utf-8")))
)


def settled_text(data: bytes) -> str:
    """What must have been emitted after `data`: all but a trailing still-completable prefix."""
    pending = next((k for k in (3, 2, 1) if len(data) >= k and data[-k:] in UTF8_PREFIXES), 0)
    return data[: len(data) - pending].decode("utf-8", errors="replace")


def test_token_bytes_match_tokenizer(tokenizer, token_bytes, byte_ids):
    ids = list(range(len(tokenizer)))
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    added = tokenizer.added_tokens_decoder
    expected = [
        added[i].content.encode("utf-8") if i in added else bytes(to_byte[c] for c in token)
        for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids))
    ]
    assert [token_bytes.bytes(i) for i in ids] == expected
    sample = ids[::97] + list(TOKEN_IDS.values())
    assert [token_bytes.piece(i) for i in sample] == tokenizer.batch_decode([[i] for i in sample])
    assert [token_bytes.bytes(i) for i in byte_ids] == [bytes([b]) for b in range(256)]
    assert token_bytes.bytes(THINK_ID) == b"<think>"
    assert token_bytes.bytes(byte_ids[0xE4]) == b"\xe4"
    assert token_bytes.piece(byte_ids[0xE4]) == "\ufffd"


def test_token_bytes_special_and_unknown_ids(tokenizer, token_bytes):
    assert token_bytes.is_special(IM_END_ID)
    assert not token_bytes.is_special(THINK_ID) and not token_bytes.is_special(END_THINK_ID)
    assert all(token_bytes.is_special(i) for i in tokenizer.all_special_ids)
    # Exactly the added tokens that decode(skip_special_tokens=True) drops.
    for i in TOKEN_IDS.values():
        assert token_bytes.is_special(i) == (tokenizer.decode([i], skip_special_tokens=True) == "")
    # Rows of the padded embedding (151936 > vocab) decode to nothing, as in tokenizer.decode.
    unknown = 151_900
    assert token_bytes.bytes(unknown) == b"" and token_bytes.piece(unknown) == ""
    assert tokenizer.decode([unknown]) == ""


@pytest.mark.parametrize("text", ["你好🙂世界", "naïve café — 👍🏽 ok", "日本語のテキスト"])
def test_multibyte_characters_never_split(tokenizer, token_bytes, byte_ids, text):
    for ids in (tokenizer.encode(text), as_byte_tokens(byte_ids, text)):
        detok = Detokenizer(token_bytes)
        deltas = [detok.add(i) for i in ids]
        assert "\ufffd" not in "".join(deltas)
        assert "".join(deltas) + detok.flush() == text
    # Byte by byte, each character comes out whole with the token carrying its last byte.
    detok = Detokenizer(token_bytes)
    deltas = [detok.add(i) for i in as_byte_tokens(byte_ids, text)]
    assert [d for d in deltas if d] == list(text)


@pytest.mark.parametrize(
    "data, deltas, tail",
    [
        (b"\x80a", ["\ufffd", "a"], ""),  # stray continuation byte: replaced at once
        (b"\xe4a", ["", "\ufffda"], ""),  # lead byte followed by ASCII
        (b"\xe0\x80", ["", "\ufffd\ufffd"], ""),  # overlong: E0 needs A0..BF next
        (b"\xed\xa0", ["", "\ufffd\ufffd"], ""),  # would be a surrogate
        (b"\xf4\x90", ["", "\ufffd\ufffd"], ""),  # above U+10FFFF
        (b"\xf0\x9f\x98\xf0", ["", "", "", "\ufffd"], "\ufffd"),  # truncated emoji, then lone lead
        (b"\xe4\xbd", ["", ""], "\ufffd"),  # incomplete at the end: one U+FFFD on flush
        (b"\xff\xfe", ["\ufffd", "\ufffd"], ""),  # bytes that never occur in UTF-8
    ],
)
def test_invalid_bytes(tokenizer, token_bytes, byte_ids, data, deltas, tail):
    ids = [byte_ids[b] for b in data]
    detok = Detokenizer(token_bytes)
    assert [detok.add(i) for i in ids] == deltas
    assert detok.flush() == tail
    assert "".join(deltas) + tail == tokenizer.decode(ids) == data.decode("utf-8", errors="replace")


def test_special_tokens(tokenizer, token_bytes, byte_ids):
    ni_hao = as_byte_tokens(byte_ids, "你")  # E4 BD A0
    ids = ni_hao[:1] + [IM_END_ID, THINK_ID, ENDOFTEXT_ID] + ni_hao[1:]
    skipped = Detokenizer(token_bytes, skip_special_tokens=True)
    # A skipped token drops out of the byte stream; <think> is an added but non-special token.
    assert [skipped.add(i) for i in ids] == ["", "", "\ufffd<think>", "", "\ufffd", "\ufffd"]
    kept = Detokenizer(token_bytes, skip_special_tokens=False)
    assert [kept.add(i) for i in ids] == [
        "", "\ufffd<|im_end|>", "<think>", "<|endoftext|>", "\ufffd", "\ufffd"
    ]  # fmt: skip
    only_special = Detokenizer(token_bytes)
    split_by_eos = ni_hao[:1] + [IM_END_ID] + ni_hao[1:]
    assert [only_special.add(i) for i in split_by_eos] == ["", "", "", "你"]
    for skip in (True, False):
        detok = Detokenizer(token_bytes, skip)
        streamed = "".join(detok.add(i) for i in ids) + detok.flush()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_decode(tokenizer, token_bytes, byte_ids, skip_special_tokens):
    pools = [
        byte_ids[0x80:],  # lead and continuation bytes, mostly invalid combinations
        [byte_ids[b] for b in b"ab \n<>"],
        range(len(tokenizer)),  # anything, including multi-byte tokens ending mid-character
        [*TOKEN_IDS.values()],
        tokenizer.encode("你好🙂世界 naïve 👍🏽 テキスト"),
    ]
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 24))]
        detok = Detokenizer(token_bytes, skip_special_tokens)
        stream, emitted = b"", ""
        for token_id in ids:
            emitted += detok.add(token_id)
            if not (skip_special_tokens and token_bytes.is_special(token_id)):
                stream += token_bytes.bytes(token_id)
            # Never a broken character, and nothing held that is already known to be invalid.
            assert emitted == settled_text(stream), ids
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert emitted + detok.flush() == expected, ids


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The stop string that completes first (then the longest); brute force over end positions."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def feed_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    released = []
    for piece in pieces:
        text, stopped = matcher.add(piece)
        released.append(text)
        if stopped:
            return "".join(released), True, released
    return "".join(released) + matcher.flush(), False, released


def random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(len(text) - 1, 0))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def test_stop_split_across_deltas():
    text, stopped, released = feed_stops(["STOP"], ["hel", "lo ST", "O", "P more", "never"])
    assert (text, stopped) == ("hello ", True)
    assert released == ["hel", "lo ", "", ""]


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        (["STOP"], ["STOP and more"], ("", True)),  # at the very start
        (["x", "y"], ["ab y x"], ("ab ", True)),  # several candidates in one delta
        (["abcd", "bc"], ["abcd"], ("a", True)),  # "bc" completes before "abcd"
        (["abcd", "bc"], ["a", "b", "c", "d"], ("a", True)),
        (["abc", "bc"], ["xabc"], ("x", True)),  # same end: the longer one cuts
        (["aab"], ["a", "a", "a", "b"], ("a", True)),  # prefix restarts inside held text
        (["cde"], ["abc", "d"], ("abcd", False)),  # never completes: flush releases it
        (["", "z"], ["abc"], ("abc", False)),  # empty stop strings are ignored
        ([""], ["abc"], ("abc", False)),
        (["界!"], ["世", "界", "!"], ("世", True)),
    ],
)
def test_stop_cases(stops, pieces, expected):
    assert feed_stops(stops, pieces)[:2] == expected


def test_stop_independent_of_chunking():
    rng = random.Random(7)
    stop_sets = [["abcd", "bc"], ["aa", "aab"], ["a b"], ["ba", "ab", "bb", "cc"], ["abcabd"]]
    for _ in range(2000):
        stops = rng.choice(stop_sets)
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 16)))
        expected = reference_stop(text, stops)
        assert feed_stops(stops, random_split(rng, text))[:2] == expected, (stops, text)


def test_stop_matcher_stays_stopped():
    matcher = StopMatcher(["x"])
    assert matcher.add("ax") == ("a", True)
    assert matcher.add("more") == ("", True)


def reference_reasoning(text: str, think_in_prompt: bool = False) -> tuple[str, str]:
    """Non-streamed split, as vLLM's qwen3 parser: tags removed, nothing else stripped."""
    if text.startswith("<think>"):
        text = text[len("<think>") :]
    elif not think_in_prompt:
        return "", text
    reasoning, _, content = text.partition("</think>")
    return reasoning, content


def feed_reasoning(pieces: list[str], think_in_prompt: bool = False) -> tuple[str, str]:
    parser = ReasoningParser(think_in_prompt)
    parts = [parser.add(piece) for piece in pieces] + [parser.flush()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


@pytest.mark.parametrize(
    "text, think_in_prompt, expected",
    [
        ("<think>\nLet me think.\n</think>\n\nHello", False, ("\nLet me think.\n", "\n\nHello")),
        ("Hello, no thinking", False, ("", "Hello, no thinking")),
        ("<think>\n\n</think>\n\nHi", False, ("\n\n", "\n\nHi")),
        ("Hello <think>x</think>", False, ("", "Hello <think>x</think>")),  # only at the start
        ("<think>cut off by length", False, ("cut off by length", "")),
        ("<think>a</thin", False, ("a</thin", "")),
        ("<thin", False, ("", "<thin")),
        ("<thinking>", False, ("", "<thinking>")),
        ("<think>a</think>b<think>c</think>", False, ("a", "b<think>c</think>")),
        ("plan</think>\n\nanswer", True, ("plan", "\n\nanswer")),
        ("still thinking", True, ("still thinking", "")),
        ("", False, ("", "")),
    ],
)
def test_reasoning_split(text, think_in_prompt, expected):
    assert reference_reasoning(text, think_in_prompt) == expected
    assert feed_reasoning([text], think_in_prompt) == expected
    assert feed_reasoning(list(text), think_in_prompt) == expected


def test_reasoning_partial_tags_are_held():
    parser = ReasoningParser()
    assert parser.add("<th") == ("", "")
    assert parser.add("ink>ab</th") == ("ab", "")
    assert parser.add("ink") == ("", "")
    assert parser.add(">\n\nok") == ("", "\n\nok")
    assert parser.add("<think>") == ("", "<think>")


def test_reasoning_streamed_equals_non_streamed():
    rng = random.Random(3)
    atoms = ["<think>", "</think>", "<th", "ink>", "</", "\n", "a", "<", ">", "思"]
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8)))
        think_in_prompt = rng.random() < 0.3
        expected = reference_reasoning(text, think_in_prompt)
        assert feed_reasoning(random_split(rng, text), think_in_prompt) == expected, text


def run_pipeline(pipeline: TextPipeline, ids: list[int]) -> tuple[str, str, int | None]:
    """Feeds ids until a stop string; returns (reasoning, content, index of the stopping id)."""
    reasoning, content = [], []
    for index, token_id in enumerate(ids):
        r, c, stopped = pipeline.add(token_id)
        reasoning.append(r)
        content.append(c)
        if stopped:
            return "".join(reasoning), "".join(content), index
    r, c = pipeline.finish()
    return "".join(reasoning) + r, "".join(content) + c, None


OUTPUT = "<think>\n推理🙂 step\n</think>\n\n答案 done STOP more"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_pipeline_reasoning_and_stop(tokenizer, token_bytes, byte_ids, as_bytes):
    ids = as_byte_tokens(byte_ids, OUTPUT) if as_bytes else tokenizer.encode(OUTPUT)
    reasoning, content, stop_at = run_pipeline(TextPipeline(token_bytes, ["STOP"]), ids)
    assert (reasoning, content) == ("\n推理🙂 step\n", "\n\n答案 done ")
    assert tokenizer.decode(ids[: stop_at + 1]).endswith("STOP")
    assert "\ufffd" not in reasoning + content


@pytest.mark.parametrize("as_bytes", [False, True])
def test_pipeline_stop_matches_raw_text(tokenizer, token_bytes, byte_ids, as_bytes):
    ids = as_byte_tokens(byte_ids, OUTPUT) if as_bytes else tokenizer.encode(OUTPUT)
    # A stop string may span the </think> tag; it ends generation inside the reasoning.
    assert run_pipeline(TextPipeline(token_bytes, ["🙂 step\n</th"]), ids)[:2] == ("\n推理", "")
    # A stop string starting inside a token, and (as bytes) with a character split over tokens.
    expected = ("\n推理🙂 step\n", "\n\n答")
    assert run_pipeline(TextPipeline(token_bytes, ["案 d"]), ids)[:2] == expected


def test_pipeline_min_tokens_covers_the_text_flushed_at_the_end(token_bytes, byte_ids):
    """A choice that ends inside its first min_tokens (a grammar's end, the context's) flushes held bytes
    unchecked too: a stop string completed there does not cut it."""
    ids = as_byte_tokens(byte_ids, "a 🙂")[:-1]  # the emoji's last byte missing: flushed as U+FFFD at the end
    stops = ["\ufffd"]
    assert run_pipeline(TextPipeline(token_bytes, stops), ids)[1] == "a "
    assert run_pipeline(TextPipeline(token_bytes, stops, min_tokens=len(ids) + 1), ids)[1] == "a \ufffd"


def test_pipeline_without_reasoning_split(tokenizer, token_bytes):
    ids = tokenizer.encode(OUTPUT)
    pipeline = TextPipeline(token_bytes, ["STOP"], split_reasoning=False)
    assert run_pipeline(pipeline, ids)[:2] == ("", OUTPUT[: OUTPUT.index("STOP")])


def test_pipeline_finish_flushes_everything(tokenizer, token_bytes, byte_ids):
    # Ends with a held stop prefix and an incomplete character; EOS is a skipped special token.
    ids = tokenizer.encode("<think>x</think>ab ST") + [byte_ids[0xE4], IM_END_ID]
    pipeline = TextPipeline(token_bytes, ["STOP"])
    assert run_pipeline(pipeline, ids) == ("x", "ab ST\ufffd", None)
    # A partial tag still held when a stop string ends generation comes out with it.
    ids = tokenizer.encode("<th") + tokenizer.encode("STOP")
    assert run_pipeline(TextPipeline(token_bytes, ["STOP"]), ids)[:2] == ("", "<th")


def test_pipeline_think_in_prompt(tokenizer, token_bytes):
    ids = tokenizer.encode("plan</think>\n\nanswer")
    pipeline = TextPipeline(token_bytes, [], think_in_prompt=True)
    assert run_pipeline(pipeline, ids) == ("plan", "\n\nanswer", None)
