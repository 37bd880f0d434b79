"""Text, token by token: `Detokenizer` keeps a growing token list's text (what a full
`tokenizer.decode` gives) at the cost of decoding a few recent tokens per token, and
`find_stop` looks for stop strings in the text just read.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence


class Decoded(Protocol):
    """What `find_stop` reads of a sequence (decoding.Seq): its text so far and its stop strings."""

    detok: "Detokenizer | None"
    params: Any  # .stop: the stop strings

    def text(self, tokenizer) -> "Detokenizer": ...

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


@functools.lru_cache(maxsize=16)
def _skipped_ids(tok) -> frozenset[int]:
    """Token ids that decode(..., skip_special_tokens=True) drops (asked of the tokenizer itself:
    which ids count as special differs between tokenizer classes)."""
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    candidates = {i for i, t in added.items() if getattr(t, "special", False)} | set(tok.all_special_ids)
    return frozenset(i for i in candidates if tok.decode([i], skip_special_tokens=True) == "")


@functools.lru_cache(maxsize=16)
def _rewrites(tok) -> bool:
    """Whether decoding rewrites earlier text (clean_up_tokenization_spaces: "a ." -> "a." once the
    "." arrives). Asked of the tokenizer: transformers ignores the setting for BPE tokenizers."""
    if not getattr(tok, "clean_up_tokenization_spaces", False):
        return False
    ids = tok("a . b", add_special_tokens=False)["input_ids"]
    return tok.decode(ids, skip_special_tokens=True) != "a . b"


class Detokenizer:
    """The text of a growing token list, equal to tokenizer.decode(tokens, skip_special_tokens=True)
    with each token costing a decode of a few recent tokens, never of the whole list.

    A window of tokens is decoded: `base`, its first tokens whose text is already out (decoded
    alone, so that whatever a decoder does to a leading token, such as SentencePiece's leading
    space, happens in both), then the tokens after it. Text after `base` is final once it does
    not end in U+FFFD (an incomplete multi-byte character a later token may complete); the window
    then moves on to start at those tokens. Special tokens decode to nothing and are left out.
    `stable` is the text without trailing U+FFFD, `pending` those characters (what a full decode
    shows at the end now). Decoders that rewrite text already out (clean_up_tokenization_spaces)
    are decoded whole, as before.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.skip = _skipped_ids(tokenizer)
        self.whole = _rewrites(tokenizer)
        self.n = 0  # tokens read
        self.window: list[int] = []  # recent tokens, specials left out
        self.base_tokens = 0  # the window's first tokens, whose text `base` is out
        self.base = ""
        self.out = 0  # characters of the window after `base` already in `stable`
        self.pieces: list[str] = []  # stable text, joined on demand
        self.length = 0  # len(stable)
        self.pending = ""
        self.last = ""  # decoding whole: the whole text at the last token
        self.offsets: list[int] = []  # per token: len(stable) before it was read
        self.decoded = 0  # tokens handed to the tokenizer's decode (a cost that must stay flat)

    @property
    def stable(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def tail(self, n: int) -> str:
        """The last n characters of the stable text, without joining all of it."""
        out, i = "", len(self.pieces)
        while len(out) < n and i:
            i -= 1
            out = self.pieces[i] + out
        return out[max(len(out) - n, 0):] if n > 0 else ""

    def read(self, tokens: Sequence[int]) -> str:
        """Read the tokens not read yet; returns the new stable text."""
        new = []
        for i in range(self.n, len(tokens)):
            self.offsets.append(self.length)
            if self.whole:
                new.append(self._whole(tokens[: i + 1]))
            elif tokens[i] not in self.skip:
                self.window.append(tokens[i])
                new.append(self._step())
        self.n = len(tokens)
        return "".join(new)

    def _decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=True)

    def _step(self) -> str:
        text = self._decode(self.window)[len(self.base):]
        stable = text.rstrip(REPLACEMENT)
        delta = stable[self.out:]
        self._append(delta)
        self.out = max(self.out, len(stable))
        self.pending = text[self.out:]
        if text and not self.pending:  # everything out: the window restarts at the tokens just read
            self.window = self.window[self.base_tokens:]
            self.base_tokens, self.out = len(self.window), 0
            self.base = self._decode(self.window)
        return delta

    def _whole(self, tokens: Sequence[int]) -> str:
        text = self.last = self._decode(list(tokens))
        stable = text.rstrip(REPLACEMENT)
        delta = stable[self.length:] if stable.startswith(self.stable) else ""
        self._append(delta)
        self.pending = text[self.length:]
        return delta

    def _append(self, delta: str) -> None:
        if delta:
            self.pieces.append(delta)
            self.length += len(delta)

    def find(self, stops: Sequence[str], fresh: str) -> int | None:
        """Where the first stop string starts in the text (stable + pending), given that none was in
        it before `fresh`, the stable text just read: only the new text and the characters before
        it that could begin a stop string are searched."""
        if not stops:
            return None
        before = self.length - len(fresh)
        lead = min(max(len(s) for s in stops) - 1, before)
        region = self.tail(lead + len(fresh)) + self.pending
        found = [region.find(s) for s in stops if s in region]
        return before - lead + min(found) if found else None


def find_stop(tok, seq: Decoded) -> int | None:
    """Character offset where the first stop string starts in the decoded text, if one appeared.

    Called after every token, so a stop string not seen before ends in the text just read. The
    text is decoded incrementally (`Detokenizer`), which keeps stop strings whose characters span
    several byte-level tokens or are interleaved with special tokens (which decode to '').
    """
    start = seq.detok.length if seq.detok is not None else 0
    detok = seq.text(tok)
    if detok.whole:
        text = detok.last
        found = [text.find(s) for s in seq.params.stop if s in text]
        return min(found) if found else None
    return detok.find(seq.params.stop, detok.tail(detok.length - start))
