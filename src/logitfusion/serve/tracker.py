"""What a client sees of one sequence as it decodes: the stable text (held back where it could
still become a stop string), the token entries for logprobs, and the fusion weights per step."""

from __future__ import annotations

import bisect
import logging
import math
from typing import Protocol

from ..engine.decoding import Seq
from .protocol import LOGPROB_FLOOR

log = logging.getLogger(__name__)


def holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Followed(Protocol):
    """What a Tracker reads of a request (the scheduler's Job)."""

    seq: Seq | None
    stream: bool
    logprobs: int | None  # None: no logprobs; k: the chosen token plus k alternatives
    return_weights: bool


class Tracker:
    """What a client sees of one sequence, computed on the scheduler thread as tokens arrive.

    Text is handed out only where it is stable: the sequence's incrementally decoded text
    (`Seq.text`: the decode of all tokens so far minus trailing U+FFFD, an incomplete multi-byte
    character completed by a later token) minus a suffix that could begin a stop string. Each
    token costs the same whatever the length: nothing here rereads the text already sent. The
    final chunk is the rest of `Seq.result`, so the streamed pieces add up to the non-streamed
    text. Token entries (for logprobs) carry each token's offset in the text; a chunk carries the
    entries of tokens that start in the text sent so far.
    """

    def __init__(self, job: Followed, tokenizer):
        self.job, self.tok = job, tokenizer
        self.sent: list[str] = []  # text handed out, in pieces
        self.n_sent = 0  # its length
        self.n_entries = 0  # token entries handed out
        self.n_steps = 0  # steps whose weights were handed out

    @property
    def seq(self) -> Seq:
        return self.job.seq

    @property
    def offsets(self) -> list[int]:
        """Start of each token in the text."""
        return self.seq.text(self.tok).offsets

    def advance(self) -> dict | None:
        """After a step: a delta {"text", "entries", "weights"} to stream, or None."""
        text = self.seq.text(self.tok)
        if not self.job.stream or self.seq.done:
            return None
        stops = list(self.seq.params.stop)
        upto = text.length - holdback(text.tail(max(map(len, stops), default=1) - 1), stops)
        if upto <= self.n_sent:
            return None
        delta = text.tail(text.length - self.n_sent)[: upto - self.n_sent]
        self.sent.append(delta)
        self.n_sent = upto
        n = bisect.bisect_left(text.offsets, upto)  # tokens starting inside the sent text
        return {"text": delta, "entries": self._entries(n), "weights": self._weights(len(self.seq.steps))}

    def finish(self, text: str) -> dict:
        """The rest, once the sequence is done: {"text", "entries", "weights"}."""
        sent = "".join(self.sent)
        if text.startswith(sent):
            delta = text[len(sent):]
        else:  # a tokenizer whose decoding is not prefix-stable (e.g. clean_up_tokenization_spaces)
            log.warning("streamed text diverged from the final decode; sent %r, final %r", sent, text)
            delta = ""
        seq = self.seq
        n = len(seq.tokens)
        offsets = self.offsets
        if seq.finish_reason == "eos":
            n -= 1  # the EOS token is not part of the text
        elif seq.finish_reason == "stop" and seq.stop_at is not None and offsets:
            n = bisect.bisect_left(offsets, seq.stop_at)  # tokens of the stop string are cut off
        return {"text": delta, "entries": self._entries(max(n, self.n_entries)) if self.job.logprobs is not None
                else [], "weights": self._weights(len(seq.steps))}

    def _entries(self, upto: int) -> list[dict]:
        job, seq = self.job, self.seq
        if job.logprobs is None:
            self.n_entries = upto
            return []
        out, text = [], seq.text(self.tok)
        offsets = text.offsets
        for i in range(self.n_entries, min(upto, len(seq.tokens), len(seq.logprobs))):
            entry = {"token": self.tok.decode([seq.tokens[i]]), "logprob": max(seq.logprobs[i], LOGPROB_FLOOR),
                     "offset": offsets[i] if i < len(offsets) else text.length, "top": []}
            if job.logprobs and i < len(seq.steps):
                entry["top"] = [(self.tok.decode([t]), math.log(p) if p > 0 else LOGPROB_FLOOR)
                                for t, p in seq.steps[i].top.get("fused", [])[: job.logprobs]]
            out.append(entry)
        self.n_entries = max(self.n_entries, upto)
        return out

    def _weights(self, upto: int) -> list[list[float]]:
        steps = self.seq.steps[self.n_steps: upto]
        self.n_steps = max(self.n_steps, upto)
        if not self.job.return_weights:
            return []
        return [s.weights for s in steps if s.weights is not None]
