"""PM-MinED: map every token of a user model's vocabulary onto one token of a delta (or expert)
model's vocabulary, so the delta's logits can be gathered into the user's vocabulary (method.md §8).

For each user token u, in order:
  1. special tokens map to the delta's special token with the same role (bos, eos, unk, pad) or
     the same string; byte tokens (SentencePiece `<0x41>`, byte-level BPE's 256-character
     alphabet, raw single bytes) map to the delta's token for the same byte;
  2. a delta token with the identical string wins (kind "exact");
  3. otherwise the candidates are the delta tokens in a prefix relation with u (either is a prefix
     of the other), leaving out the bare word-boundary marker unless u is only markers; the one at
     minimum Levenshtein distance wins, ties going to the lower id (kind "approx");
  4. no candidate: unmapped (-1); `VocabMap.apply` gives the delta's contribution 0 there.

Strings are compared in one canonical form: the token's raw bytes, held as a latin-1 `str` (one
character per byte). So SentencePiece's `▁` and byte-level BPE's `Ġ` both become a space, `Ċ`
becomes a newline, `<0x0A>` becomes the byte 0x0A, and distances are counted in bytes.

    delta_to_user = build_or_load("models/large", "experts/other-vocab", cache_dir=".cache/vocab")
    z_user_space = delta_to_user.apply(z_delta)          # [..., V_delta] -> [..., V_user]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

VERSION = 1  # of the mapping rules; a cached map built by another version is rebuilt
KINDS = ("unmapped", "special", "byte", "exact", "approx")  # kind codes 0..4, as stored
UNMAPPED, SPECIAL, BYTE, EXACT, APPROX = range(5)
MARKER = " "  # the canonical word-boundary marker (▁ and Ġ both become it)
ROLES = ("bos", "eos", "unk", "pad")
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_META_KEY = "logitfusion_vocabmap"


class VocabError(ValueError):
    """A tokenizer could not be read, or a mapping does not fit the logits or tokenizers given."""


# --------------------------------------------------------------------------- canonical forms

@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable character -> the byte it stands for."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


def canonical(raw: str, family: str) -> str:
    """The token's bytes as a latin-1 string, whatever the tokenizer family writes them as."""
    if family == "bytelevel":
        dec = _byte_level_decoder()
        if all(c in dec for c in raw):
            return _latin1(bytes(dec[c] for c in raw))
        return _latin1(raw.encode("utf-8"))  # an added token stored as plain text
    if family == "sentencepiece":
        m = _SP_BYTE.match(raw)
        if m:
            return chr(int(m.group(1), 16))
        return _latin1(raw.replace("▁", " ").encode("utf-8"))
    return _latin1(raw.encode("utf-8"))  # "plain": strings are the text itself


def _byte_of(raw: str, family: str) -> int:
    """The byte a byte token stands for, or -1 when the token is not a byte token."""
    if family == "bytelevel":
        return _byte_level_decoder().get(raw, -1) if len(raw) == 1 else -1
    if family == "sentencepiece":
        m = _SP_BYTE.match(raw)
        return int(m.group(1), 16) if m else -1
    if family == "bytes":
        return ord(raw) if len(raw) == 1 else -1
    return -1


# --------------------------------------------------------------------------- vocabularies

@dataclass
class Vocab:
    """One tokenizer's vocabulary, as the mapping needs it. Ids without a token are holes ("")."""

    name: str
    family: str  # bytelevel | sentencepiece | bytes | plain
    raw: list[str]  # token strings as the tokenizer stores them (bytes: latin-1 of the bytes)
    special: list[bool]
    roles: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    canon: list[str] = field(init=False)
    byte: list[int] = field(init=False)  # byte value of byte tokens, else -1

    def __post_init__(self):
        self.canon = [canonical(r, self.family) if self.family != "bytes" else r for r in self.raw]
        self.byte = [-1 if s else _byte_of(r, self.family) for r, s in zip(self.raw, self.special)]

    def __len__(self) -> int:
        return len(self.raw)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything the mapping reads: family, token strings, specials and roles."""
        blob = json.dumps([self.family, self.raw, self.special, sorted(self.roles.items())], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def display(self, i: int) -> str:
        """Token i for people: as stored, except raw-byte vocabularies, shown as UTF-8 text."""
        if self.family == "bytes":
            return self.raw[i].encode("latin-1").decode("utf-8", errors="backslashreplace")
        return self.raw[i]

    def describe(self) -> dict:
        return {"name": self.name, "size": len(self), "family": self.family, "fingerprint": self.fingerprint}


def _detect_family(tokens: list[str], serialized: dict | None = None) -> str:
    parts = json.dumps([serialized.get(k) for k in ("decoder", "pre_tokenizer")]) if serialized else ""
    if '"ByteLevel"' in parts:
        return "bytelevel"
    if '"Metaspace"' in parts or any("▁" in t for t in tokens):
        return "sentencepiece"
    dec = _byte_level_decoder()
    if any("Ġ" in t for t in tokens) and all(c in dec for t in tokens for c in t):
        return "bytelevel"
    return "plain"


def _from_id_table(name, family, table: dict[int, str], special_ids: set[int], roles: dict) -> Vocab:
    size = max(table) + 1 if table else 0
    raw = [""] * size  # ids that no token uses stay holes (always unmapped)
    for i, t in table.items():
        raw[i] = t
    special = [i in special_ids for i in range(size)]
    return Vocab(name, family, raw, special, {k: v for k, v in roles.items() if v is not None and 0 <= v < size})


def from_hf(tok, name: str = "tokenizer", family: str | None = None) -> Vocab:
    """A transformers fast tokenizer or a `tokenizers.Tokenizer`. The family comes from its decoder
    or pre-tokenizer (ByteLevel, Metaspace), else from the token strings. Non-special added tokens
    are stored as plain text by `tokenizers`; their canonical form is taken from that text."""
    backend = getattr(tok, "backend_tokenizer", tok)
    table = {i: t for t, i in tok.get_vocab().items()}
    added = backend.get_added_tokens_decoder()
    special_ids = {i for i, a in added.items() if a.special} | set(getattr(tok, "all_special_ids", []) or [])
    roles = {r: getattr(tok, f"{r}_token_id", None) for r in ROLES}
    serialized = json.loads(backend.to_str())
    fam = family or _detect_family([t for i, t in table.items() if i not in added], serialized)
    vocab = _from_id_table(name, fam, table, special_ids, roles)
    for i, a in added.items():  # plain-text added tokens: canonical = their text
        if not a.special and fam in ("bytelevel", "sentencepiece") and i < len(vocab):
            vocab.canon[i] = _latin1(a.content.encode("utf-8"))
    return vocab


def _proto_fields(buf: bytes):
    """(field number, value) pairs of one protobuf message: just enough to read SentencePiece."""
    def varint(i):
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, i
            shift += 7
    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise VocabError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def from_sentencepiece(path: str | Path) -> Vocab:
    """A SentencePiece `.model` file, read directly (no sentencepiece package needed).
    Piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte."""
    raw, special = [], []
    try:
        for number, value in _proto_fields(Path(path).read_bytes()):
            if number == 1:  # ModelProto.pieces
                piece = dict(_proto_fields(value))
                raw.append(piece[1].decode("utf-8"))
                special.append(piece.get(3, 1) in (2, 3, 5))
    except (VocabError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise VocabError(f"tokenizer {str(path)!r} could not be loaded: not a SentencePiece model ({e!r})") from None
    if not raw:
        raise VocabError(f"tokenizer {str(path)!r} could not be loaded: no SentencePiece pieces in it")
    roles = {r: raw.index(s) for r, s in zip(ROLES, ("<s>", "</s>", "<unk>", "<pad>")) if s in raw}
    return Vocab(Path(path).name, "sentencepiece", raw, special, roles)


def from_tekken(path: str | Path) -> Vocab:
    """A Mistral `tekken*.json` file, through mistral-common's own Tekkenizer."""
    try:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        raise VocabError(f"{path} is a Mistral tekken file; reading it needs `pip install mistral-common`") from None
    tk = Tekkenizer.from_file(str(path))
    raw = [_latin1(tk.id_to_byte_piece(i, "keep")) for i in range(tk.n_words)]
    special = [i < tk.num_special_tokens for i in range(tk.n_words)]
    roles = {r: getattr(tk, f"{r}_id", None) for r in ROLES}
    return Vocab(Path(path).name, "bytes", raw, special, {k: v for k, v in roles.items() if v is not None and v >= 0})


def load_vocab(path: str | Path) -> Vocab:
    """A Hugging Face tokenizer folder, a `tokenizer.json`, a SentencePiece `.model` file or a
    Mistral tekken `.json` file."""
    p = Path(path)
    if not p.exists():
        raise VocabError(f"tokenizer path {str(p)!r} does not exist")
    try:
        if p.is_dir():
            from transformers import AutoTokenizer
            return from_hf(AutoTokenizer.from_pretrained(str(p), local_files_only=True), p.name)
        if ".model" in p.suffixes:  # tokenizer.model, tokenizer.model.v3 ...
            return from_sentencepiece(p)
        if p.suffix == ".json":
            head = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(head.get("vocab"), list) and "config" in head:
                return from_tekken(p)
            from tokenizers import Tokenizer
            return from_hf(Tokenizer.from_file(str(p)), p.name)
    except VocabError:
        raise
    except Exception as e:  # transformers, tokenizers and json raise many kinds here
        raise VocabError(f"tokenizer {str(p)!r} could not be loaded: {type(e).__name__}: {e}") from None
    raise VocabError(f"tokenizer {str(p)!r}: expected a tokenizer folder, a tokenizer.json, a SentencePiece "
                     ".model or a Mistral tekken .json")


def as_vocab(tok: Any) -> Vocab:
    """A Vocab from a Vocab, a path, or a tokenizer object."""
    if isinstance(tok, Vocab):
        return tok
    if isinstance(tok, (str, Path)):
        return load_vocab(tok)
    return from_hf(tok, getattr(tok, "name_or_path", "") or type(tok).__name__)


# --------------------------------------------------------------------------- the mapping

@dataclass
class _DeltaIndex:
    """The delta's lookups: roles and special strings, bytes, and one id per canonical string
    (identical raw string first, then ordinary tokens over byte tokens, then the lower id)."""

    roles: dict[str, int]
    specials: dict[str, int]
    bytes: dict[int, int]
    raw: dict[str, int]
    canon: dict[str, int]
    keys: list[str]  # sorted canonical strings, for prefix ranges
    key_ids: np.ndarray


def _index(delta: Vocab) -> _DeltaIndex:
    specials, byte_ids, raw, canon = {}, {}, {}, {}
    for i, (r, c, s, b) in enumerate(zip(delta.raw, delta.canon, delta.special, delta.byte)):
        if s:
            specials.setdefault(r, i)
        elif r or c:
            if b >= 0:
                byte_ids.setdefault(b, i)
            raw.setdefault(r, i)
            j = canon.get(c)
            if j is None or (delta.byte[j] >= 0 and b < 0):
                canon[c] = i
    keys = sorted(canon)
    return _DeltaIndex(delta.roles, specials, byte_ids, raw, canon, keys, np.array([canon[k] for k in keys]))


def _special(u: int, user: Vocab, d: _DeltaIndex) -> int:
    for role, uid in user.roles.items():
        if uid == u and role in d.roles:
            return d.roles[role]
    return d.specials.get(user.raw[u], -1)


def _exact(raw: str, c: str, delta: Vocab, d: _DeltaIndex) -> int:
    j = d.raw.get(raw)
    if j is not None and delta.canon[j] == c:
        return j
    return d.canon.get(c, -1)


def candidates(c: str, d: _DeltaIndex) -> list[int]:
    """Delta ids whose canonical string is a proper prefix of c, or has c as a proper prefix.
    The bare marker is left out unless c is only markers. At most len(c) dictionary lookups plus
    one contiguous range of the sorted keys."""
    only_markers = c.strip(MARKER) == ""
    found = [d.canon[c[:k]] for k in range(1, len(c))
             if c[:k] in d.canon and (only_markers or c[:k] != MARKER)]
    lo, hi = bisect_left(d.keys, c), bisect_left(d.keys, c + "\u0100")  # keys are latin-1: < U+0100
    found += [int(i) for k, i in zip(d.keys[lo:hi], d.key_ids[lo:hi]) if k != c]
    return found


def _nearest(c: str, ids: list[int], delta: Vocab) -> int:
    """Minimum Levenshtein distance to c, ties to the lower id."""
    return min(ids, key=lambda i: (Levenshtein.distance(c, delta.canon[i]), i))


def _map_one(u: int, user: Vocab, delta: Vocab, d: _DeltaIndex) -> tuple[int, int]:
    if user.special[u]:
        j = _special(u, user, d)
        return (j, SPECIAL) if j >= 0 else (-1, UNMAPPED)
    if user.byte[u] >= 0 and user.byte[u] in d.bytes:
        return d.bytes[user.byte[u]], BYTE
    c = user.canon[u]
    if not c:
        return -1, UNMAPPED
    j = _exact(user.raw[u], c, delta, d)
    if j >= 0:
        return j, EXACT
    ids = candidates(c, d)
    return (_nearest(c, ids, delta), APPROX) if ids else (-1, UNMAPPED)


def build_map(user: Any, delta: Any, n_examples: int = 5) -> "VocabMap":
    """Map every token of `user` onto one token of `delta` (Vocab, tokenizer object or path)."""
    user, delta = as_vocab(user), as_vocab(delta)
    start = time.perf_counter()
    d = _index(delta)
    pairs = [_map_one(u, user, delta, d) for u in range(len(user))]
    seconds = time.perf_counter() - start
    index = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    kinds = torch.tensor([p[1] for p in pairs], dtype=torch.uint8)
    meta = {"version": VERSION, "user": user.describe(), "delta": delta.describe(),
            "seconds": round(seconds, 3), "examples": _examples(index, kinds, user, delta, n_examples)}
    return VocabMap(index, kinds, meta)


def _examples(index, kinds, user: Vocab, delta: Vocab, n: int) -> dict[str, list]:
    """Up to n examples per kind, spread evenly over the ids: [user id, user token, delta id, delta token]."""
    out = {}
    for code, name in enumerate(KINDS):
        ids = (kinds == code).nonzero().flatten().tolist()
        picks = [ids[k * len(ids) // n] for k in range(n)] if len(ids) > n else ids
        out[name] = [[u, user.display(u), int(index[u]), delta.display(int(index[u])) if index[u] >= 0 else None]
                     for u in dict.fromkeys(picks)]
    return out


@dataclass
class VocabMap:
    """index[u] = the delta token for user token u (-1: unmapped); kinds[u] = how it was chosen."""

    index: torch.Tensor  # int64 [V_user]
    kinds: torch.Tensor  # uint8 [V_user], codes into KINDS
    meta: dict

    def __len__(self) -> int:
        return self.index.numel()

    @property
    def counts(self) -> dict[str, int]:
        return {name: int((self.kinds == code).sum()) for code, name in enumerate(KINDS)}

    @property
    def examples(self) -> dict[str, list]:
        return self.meta.get("examples", {})

    def kind(self, user_token_id: int) -> str:
        return KINDS[int(self.kinds[user_token_id])]

    def is_exact(self, user_token_id: int) -> bool:
        """True when the delta has this very token (special, byte or identical string), so the
        delta's context can be extended with index[u]; otherwise it must be re-tokenised."""
        return int(self.kinds[user_token_id]) in (SPECIAL, BYTE, EXACT)

    def apply(self, z_delta: torch.Tensor) -> torch.Tensor:
        """[..., V_delta] delta logits -> [..., V_user]: a gather, 0 where u is unmapped."""
        need = self.meta["delta"]["size"]
        if z_delta.shape[-1] < need:
            raise VocabError(f"delta logits have {z_delta.shape[-1]} entries but the mapping was built for a "
                             f"delta vocabulary of {need} tokens")  # extra (padded) rows are fine
        index = self.index.to(z_delta.device)
        out = z_delta.index_select(-1, index.clamp_min(0))
        return out.masked_fill(index < 0, 0)

    def save(self, path: str | Path) -> Path:
        """safetensors: `index`, `kinds` and a JSON header with both tokenizers' fingerprints."""
        from safetensors.torch import save
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({"index": self.index.contiguous(), "kinds": self.kinds.contiguous()},
                    metadata={_META_KEY: json.dumps(self.meta, ensure_ascii=False)})
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a crash never leaves half a file under the real name
        return path

    @classmethod
    def load(cls, path: str | Path) -> "VocabMap":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                return cls(f.get_tensor("index"), f.get_tensor("kinds"), meta)
        except Exception as e:  # safetensors, json and a missing key all mean the same here
            raise VocabError(f"{path}: not a vocabulary map ({type(e).__name__}: {e})") from None

    def matches(self, user: Vocab, delta: Vocab) -> bool:
        return (self.meta.get("version") == VERSION and self.meta["user"]["fingerprint"] == user.fingerprint
                and self.meta["delta"]["fingerprint"] == delta.fingerprint)

    def report(self) -> str:
        c, n = self.counts, max(len(self), 1)
        u, d = self.meta["user"], self.meta["delta"]
        lines = [f"{u['name']} ({u['size']} tokens, {u['family']}) -> {d['name']} ({d['size']} tokens, {d['family']})"]
        for name in ("exact", "approx", "special", "byte", "unmapped"):
            lines.append(f"  {name:9s} {c[name]:8d}  {100 * c[name] / n:5.1f}%")
        lines.append(f"  built in {self.meta['seconds']:.2f} s")
        return "\n".join(lines)


def build_or_load(user: Any, delta: Any, cache_dir: str | Path | None = None) -> VocabMap:
    """The mapping from a cache file keyed by both fingerprints, built and saved when missing or
    stale (another tokenizer, or another version of the rules)."""
    user, delta = as_vocab(user), as_vocab(delta)
    if cache_dir is None:
        return build_map(user, delta)
    path = Path(cache_dir) / f"vocabmap-{user.fingerprint[:16]}-{delta.fingerprint[:16]}.safetensors"
    if path.is_file():
        try:
            cached = VocabMap.load(path)
            if cached.matches(user, delta):
                return cached
        except VocabError:
            pass  # unreadable: rebuild
    vmap = build_map(user, delta)
    vmap.save(path)
    return vmap
