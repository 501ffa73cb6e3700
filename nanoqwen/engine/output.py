"""A step's sampled token -> the Event of its choice: text and reasoning deltas, logprobs, and
whether (and why) the choice finished."""
from __future__ import annotations

from nanoqwen.engine.request import Event, TokenLogprob, TopLogprob, Usage
from nanoqwen.engine.sequence import Request, Sequence
from nanoqwen.runner import StepOutput
from nanoqwen.runner.prompt_logprobs import PromptLogprobsOutput
from nanoqwen.text import TokenBytes


def token_event(seq: Sequence, row: int, output: StepOutput, token_bytes: TokenBytes,
                max_model_len: int) -> tuple[Event, str | None]:
    """Appends row `row`'s token to `seq`; -> (its event, the finish reason or None)."""
    token = output.tokens[row]
    params = seq.request.params
    event = first_event(seq) if seq.num_output_tokens == 0 else Event(index=seq.index)
    seq.token_ids.append(token)
    event.token_ids = [token]
    stopped_by_token = token in seq.request.stop_ids
    start = seq.text.offset
    finish = None
    if stopped_by_token:
        finish = "stop"
    else:
        event.reasoning, event.text, stopped = seq.text.add(token)
        if stopped:
            finish = "stop"
        elif seq.num_output_tokens >= seq.max_tokens or len(seq) >= max_model_len:
            finish = "length"
    if finish == "length" or stopped_by_token:  # text held back for a possible stop string is final
        reasoning, text = seq.text.finish()
        event.reasoning += reasoning
        event.text += text
    if params.logprobs:
        listed = params.stop_token_logprob or not stopped_by_token
        entry = token_logprob(token, output, row, params.top_logprobs, token_bytes) if listed else None
        event.logprobs = released_logprobs(seq, entry, start, finish is not None)
    return event, finish


def released_logprobs(seq: Sequence, entry: TokenLogprob | None, start: int, ends: bool) -> list[TokenLogprob]:
    """The logprobs that go out now, `entry` (the token's whose text starts at `start`, None: unlisted) last. With
    stop strings a token's logprob goes out with its text, the first of it released, and is dropped with it where a
    stop string cut it away, as llama.cpp drops the stop word's tokens': the tokens listed spell the text (the last may
    run on into the cut), streamed or not. At the end (`ends`) all that was not cut go."""
    text = seq.text
    if not text.holds:
        return [] if entry is None else [entry]
    held = seq.held_logprobs
    if entry is not None:
        held.append((start, entry))
    everything = ends and text.released == text.offset
    count = len(held) if everything else next((i for i, (at, _) in enumerate(held) if at >= text.released), len(held))
    out = [lp for _, lp in held[:count]]
    seq.held_logprobs = [] if ends else held[count:]
    return out


def first_event(seq: Sequence) -> Event:
    """The start of a choice's first event: it carries the prompt's logprobs when they were asked for."""
    return Event(index=seq.index, prompt_logprobs=seq.request.prompt_logprobs)


def prompt_token_logprobs(seq: Sequence, scored: PromptLogprobsOutput, tb: TokenBytes) -> list[TokenLogprob]:
    """The runner's scores of prompt tokens scored.start + 1 .. as TokenLogprobs."""
    targets = seq.token_ids[scored.start + 1 : scored.start + 1 + len(scored.logprobs)]
    return [
        TokenLogprob(token_id=t, token=tb.piece(t), logprob=lp, bytes=list(tb.bytes(t)), top_logprobs=[
            TopLogprob(token_id=i, token=tb.piece(i), logprob=v, bytes=list(tb.bytes(i))) for i, v in zip(ids, values)
        ], rank=rank)
        for t, lp, values, ids, rank in zip(targets, scored.logprobs, scored.top_values, scored.top_ids,
                                            scored.ranks or [None] * len(targets))
    ]


def token_logprob(token: int, output: StepOutput, row: int, k: int, tb: TokenBytes) -> TokenLogprob:
    top = [
        TopLogprob(token_id=t, token=tb.piece(t), logprob=v, bytes=list(tb.bytes(t)))
        for t, v in zip(output.top_ids[row][:k], output.top_values[row][:k])
    ]
    return TokenLogprob(token_id=token, token=tb.piece(token), logprob=output.logprobs[row],
                        bytes=list(tb.bytes(token)), top_logprobs=top)


def usage_event(request: Request) -> Event:
    """The request's last event, once every choice has finished."""
    return Event(index=0, usage=Usage(
        prompt_tokens=request.num_prompt_tokens,
        completion_tokens=sum(s.num_output_tokens for s in request.sequences),
        cached_tokens=request.cached_tokens,
    ))
