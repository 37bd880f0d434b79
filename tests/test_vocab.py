"""PM-MinED vocabulary mapping (method.md §8): hand-made vocabularies for each rule, the toy
tokenizers, real Mistral tokenizer files from mistral-common, save/load/cache and the CLI."""

import os
import time
from pathlib import Path

import pytest
import torch
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from logitfusion.testing import toy
from logitfusion.cli import app
from logitfusion.engine.vocab import (VocabError, VocabMap, as_vocab, build_map, build_or_load, from_hf,
                               load_vocab)


def hf_tokenizer(tokens, specials=(), decoder=None, **roles):
    """A real in-memory fast tokenizer whose ids are the list positions."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    if decoder is not None:
        tok.decoder = decoder
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def ids(vocab_tokens, *tokens):
    return [vocab_tokens.index(t) for t in tokens]


def reference_map(user, delta):
    """§8 read literally, O(V_user x V_delta): the test oracle. Where several ordinary delta tokens
    share one canonical string (SentencePiece "▁" and "<0x20>"), the string stands for the one
    with the same raw text, else the non-byte one, else the lower id."""
    out = []
    ordinary = [j for j in range(len(delta)) if not delta.special[j] and delta.canon[j]]
    first = {}
    for j in sorted(ordinary, key=lambda j: (delta.byte[j] >= 0, j)):
        first.setdefault(delta.canon[j], j)
    ordinary = [j for j in ordinary if first[delta.canon[j]] == j]
    for u in range(len(user)):
        if user.special[u]:
            role = [r for r, i in user.roles.items() if i == u and r in delta.roles]
            same = [j for j in range(len(delta)) if delta.special[j] and delta.raw[j] == user.raw[u]]
            out.append(("special", delta.roles[role[0]]) if role else ("special", same[0]) if same else ("unmapped", -1))
            continue
        byte = [j for j in range(len(delta)) if user.byte[u] >= 0 and delta.byte[j] == user.byte[u]]
        if byte:
            out.append(("byte", byte[0]))
            continue
        c = user.canon[u]
        same = [j for j in range(len(delta)) if not delta.special[j] and delta.raw[j] == user.raw[u]
                and delta.canon[j] == c] or [j for j in ordinary if delta.canon[j] == c]
        if same:
            out.append(("exact", same[0]))
            continue
        only_markers = set(c) <= {" "}
        cands = [j for j in ordinary if (c.startswith(delta.canon[j]) or delta.canon[j].startswith(c))
                 and (only_markers or delta.canon[j] != " ")]
        if cands:
            out.append(("approx", min(cands, key=lambda j: (Levenshtein.distance(c, delta.canon[j]), j))))
        else:
            out.append(("unmapped", -1))
    return out


def assert_matches_reference(vmap, user, delta):
    ref = reference_map(user, delta)
    got = [(vmap.kind(u), int(vmap.index[u])) for u in range(len(user))]
    bad = [(u, user.raw[u], g, r) for u, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert not bad, bad[:10]


# --------------------------------------------------------------------------- hand-made vocabularies

SP_USER = ["<unk>", "<s>", "</s>", "<0x41>", "<0x0A>", "<0x20>", "▁the", "▁cat", "▁cats", "▁zebra", "▁",
           "▁▁▁", "abc", "xyz", "▁hello", "hello"]
BL_DELTA = ["<unk>", "<|endoftext|>", "A", "Ċ", "Ġ", "Ġthe", "Ġcat", "Ġcatsup", "abcd", "ab", "ĠĠĠĠ",
            "Ġhello", "hel", "Ġz", "ĠĊ", "ĊĊ"]


@pytest.fixture(scope="module")
def sp_user():
    return from_hf(hf_tokenizer(SP_USER, ["<unk>", "<s>", "</s>"], decoders.Metaspace(),
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>"), "sp-user")


@pytest.fixture(scope="module")
def bl_delta():
    return from_hf(hf_tokenizer(BL_DELTA, ["<unk>", "<|endoftext|>"], decoders.ByteLevel(),
                                unk_token="<unk>", eos_token="<|endoftext|>"), "bl-delta")


@pytest.fixture(scope="module")
def sp_to_bl(sp_user, bl_delta):
    return build_map(sp_user, bl_delta)


def test_families_are_detected_and_space_markers_normalised(sp_user, bl_delta):
    assert (sp_user.family, bl_delta.family) == ("sentencepiece", "bytelevel")
    assert sp_user.canon[SP_USER.index("▁hello")] == bl_delta.canon[BL_DELTA.index("Ġhello")] == " hello"
    assert bl_delta.canon[BL_DELTA.index("ĠĊ")] == " \n" and bl_delta.canon[BL_DELTA.index("ĊĊ")] == "\n\n"
    assert sp_user.canon[SP_USER.index("<0x0A>")] == "\n"
    assert sp_user.byte[SP_USER.index("<0x41>")] == 0x41 and bl_delta.byte[BL_DELTA.index("A")] == 0x41
    assert sp_user.byte[SP_USER.index("▁the")] == -1 and sp_user.special[:3] == [True] * 3


def test_rule1_specials_by_role_then_string_and_bytes_by_value(sp_to_bl):
    m = sp_to_bl
    assert m.index[SP_USER.index("<unk>")] == BL_DELTA.index("<unk>")
    assert m.index[SP_USER.index("</s>")] == BL_DELTA.index("<|endoftext|>")  # both are eos
    assert m.kind(SP_USER.index("<s>")) == "unmapped"  # the delta has no bos and no "<s>"
    for u, d in [("<0x41>", "A"), ("<0x0A>", "Ċ"), ("<0x20>", "Ġ")]:
        assert (m.kind(SP_USER.index(u)), int(m.index[SP_USER.index(u)])) == ("byte", BL_DELTA.index(d))


def test_rule2_identical_string_across_space_marker_families(sp_to_bl):
    for u, d in [("▁the", "Ġthe"), ("▁cat", "Ġcat"), ("▁hello", "Ġhello")]:
        assert (sp_to_bl.kind(SP_USER.index(u)), int(sp_to_bl.index[SP_USER.index(u)])) == ("exact", BL_DELTA.index(d))


def test_rule3_nearest_prefix_relative_ties_to_lower_id_and_bare_marker(sp_to_bl):
    m = sp_to_bl
    def got(u):
        return m.kind(SP_USER.index(u)), BL_DELTA[int(m.index[SP_USER.index(u)])] if m.index[SP_USER.index(u)] >= 0 else None
    assert got("▁cats") == ("approx", "Ġcat")  # " cat" (distance 1) beats " catsup" (3)
    assert got("abc") == ("approx", "abcd")  # "abcd" and "ab" both at distance 1: lower id wins
    assert got("hello") == ("approx", "hel")  # u longer than the candidate
    assert got("▁zebra") == ("approx", "Ġz")
    assert got("▁▁▁") == ("approx", "ĠĠĠĠ")  # only markers: "Ġ" would be allowed, "ĠĠĠĠ" is nearer
    assert got("▁") == ("exact", "Ġ")  # an ordinary piece: rule 2, the same string " "
    assert got("xyz") == ("unmapped", None)


def test_ties_go_to_the_lower_id_whichever_side_of_u():
    user = from_hf(hf_tokenizer(["<unk>", "abc"], ["<unk>"]))
    for delta_tokens, winner in [(["<unk>", "ab", "abcd"], "ab"), (["<unk>", "abcd", "ab"], "abcd")]:
        m = build_map(user, from_hf(hf_tokenizer(delta_tokens, ["<unk>"])))
        assert m.kind(1) == "approx" and delta_tokens[int(m.index[1])] == winner


def test_bare_marker_is_a_candidate_only_for_marker_tokens():
    user = from_hf(hf_tokenizer(["<unk>", "Ġzebra", "ĠĠ", "Ġx"], ["<unk>"], decoders.ByteLevel()))
    delta = from_hf(hf_tokenizer(["<unk>", "▁", "▁a"], ["<unk>"], decoders.Metaspace()))
    m = build_map(user, delta)
    assert m.kind(1) == "unmapped"  # " zebra": only the bare marker is a prefix of it
    assert (m.kind(2), int(m.index[2])) == ("approx", 1)  # "  " is only markers: " " is allowed
    assert m.kind(3) == "unmapped"


def test_hand_made_maps_agree_with_the_literal_reference(sp_user, bl_delta, sp_to_bl):
    assert_matches_reference(sp_to_bl, sp_user, bl_delta)
    assert_matches_reference(build_map(bl_delta, sp_user), bl_delta, sp_user)


def test_newline_markers_map_across_families(bl_delta, sp_user):
    m = build_map(bl_delta, sp_user)
    assert (m.kind(BL_DELTA.index("Ċ")), SP_USER[int(m.index[BL_DELTA.index("Ċ")])]) == ("byte", "<0x0A>")
    assert (m.kind(BL_DELTA.index("ĊĊ")), SP_USER[int(m.index[BL_DELTA.index("ĊĊ")])]) == ("approx", "<0x0A>")
    assert m.index[BL_DELTA.index("<|endoftext|>")] == SP_USER.index("</s>")


# --------------------------------------------------------------------------- apply, exactness, files

def test_apply_gathers_and_zeros_unmapped(sp_to_bl):
    z = torch.randn(2, 3, len(BL_DELTA))
    out = sp_to_bl.apply(z)
    assert out.shape == (2, 3, len(SP_USER))
    for u in range(len(SP_USER)):
        d = int(sp_to_bl.index[u])
        expected = z[..., d] if d >= 0 else torch.zeros(2, 3)
        assert torch.equal(out[..., u], expected), SP_USER[u]
    assert (sp_to_bl.index < 0).any()
    with pytest.raises(VocabError, match="delta logits have"):
        sp_to_bl.apply(torch.randn(len(BL_DELTA) - 5))


def test_is_exact_is_true_only_for_identical_tokens(sp_to_bl):
    exact = [SP_USER[u] for u in range(len(SP_USER)) if sp_to_bl.is_exact(u)]
    assert exact == ["<unk>", "</s>", "<0x41>", "<0x0A>", "<0x20>", "▁the", "▁cat", "▁", "▁hello"]


def test_save_load_round_trip(sp_to_bl, sp_user, bl_delta, tmp_path):
    path = sp_to_bl.save(tmp_path / "m.safetensors")
    back = VocabMap.load(path)
    assert torch.equal(back.index, sp_to_bl.index) and torch.equal(back.kinds, sp_to_bl.kinds)
    assert back.meta == sp_to_bl.meta and back.counts == sp_to_bl.counts
    assert back.matches(sp_user, bl_delta) and not back.matches(bl_delta, sp_user)
    (tmp_path / "junk.safetensors").write_bytes(b"not a map")
    with pytest.raises(VocabError, match="not a vocabulary map"):
        VocabMap.load(tmp_path / "junk.safetensors")


def test_a_damaged_cache_file_is_rebuilt(sp_user, bl_delta, tmp_path):
    first = build_or_load(sp_user, bl_delta, tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:40])
    again = build_or_load(sp_user, bl_delta, tmp_path)
    assert torch.equal(again.index, first.index) and VocabMap.load(path).matches(sp_user, bl_delta)


def test_plain_text_added_tokens_of_a_byte_level_tokenizer():
    tok = hf_tokenizer(["<unk>", "Ġhello", "Ġwor"], ["<unk>"], decoders.ByteLevel())
    tok.add_tokens([" world"])  # stored as text, not as "Ġworld"
    user = from_hf(tok)
    assert user.canon[3] == " world"
    delta = from_hf(hf_tokenizer(["<unk>", "▁world", "▁hello"], ["<unk>"], decoders.Metaspace()))
    m = build_map(user, delta)
    assert [(m.kind(u), int(m.index[u])) for u in (1, 2, 3)] == [("exact", 2), ("approx", 1), ("exact", 1)]


def test_cache_is_reused_and_invalidated_when_a_tokenizer_changes(sp_user, bl_delta, tmp_path):
    first = build_or_load(sp_user, bl_delta, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    os.utime(files[0], (1, 1))
    again = build_or_load(sp_user, bl_delta, tmp_path)
    assert files[0].stat().st_mtime == 1  # read, not rewritten
    assert torch.equal(again.index, first.index) and again.meta == first.meta
    changed = from_hf(hf_tokenizer(BL_DELTA + ["Ġcats"], ["<unk>", "<|endoftext|>"], decoders.ByteLevel(),
                                   unk_token="<unk>", eos_token="<|endoftext|>"))
    rebuilt = build_or_load(sp_user, changed, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert rebuilt.kind(SP_USER.index("▁cats")) == "exact" and first.kind(SP_USER.index("▁cats")) == "approx"


# --------------------------------------------------------------------------- toy tokenizers

@pytest.fixture(scope="module")
def toy_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_vocab")
    paths = {}
    for n in (280, 300, 600):
        toy.build_tokenizer(root / f"tok{n}", vocab_size=n)
        paths[n] = str(root / f"tok{n}")
    return paths


def test_toy_tokenizer_onto_itself_is_the_identity(toy_tokenizers):
    v = load_vocab(toy_tokenizers[300])
    m = build_map(v, v)
    assert v.family == "bytelevel"
    assert torch.equal(m.index, torch.arange(len(v)))
    assert all(m.is_exact(u) for u in range(len(v)))
    assert m.counts["special"] == 4 and m.counts["byte"] == 256 and m.counts["exact"] == len(v) - 260


def test_toy_tokenizers_of_different_sizes(toy_tokenizers):
    v280, v300, v600 = (load_vocab(toy_tokenizers[n]) for n in (280, 300, 600))
    assert len(v280) == 280 and len(v300) == 300 and len(v600) > 300
    up = build_map(v280, v300)  # the same BPE trained longer: every token is still there
    assert up.counts["approx"] == up.counts["unmapped"] == 0
    down = build_map(v300, v280)
    assert down.counts["exact"] + down.counts["byte"] + down.counts["special"] == 280
    assert down.counts["approx"] + down.counts["unmapped"] == 20 and down.counts["approx"] >= 10
    for user, delta in [(v300, v280), (v600, v300), (v300, v600)]:
        assert_matches_reference(build_map(user, delta), user, delta)


# --------------------------------------------------------------------------- real Mistral tokenizers

@pytest.fixture(scope="module")
def mistral_data():
    mc = pytest.importorskip("mistral_common")
    return Path(mc.__file__).parent / "data"


def test_mistral_sentencepiece_files(mistral_data):
    v1 = load_vocab(mistral_data / "tokenizer.model.v1")
    v3 = load_vocab(mistral_data / "mistral_instruct_tokenizer_240323.model.v3")
    assert (len(v1), len(v3), v1.family) == (32000, 32768, "sentencepiece")
    assert v1.raw[1:3] == ["<s>", "</s>"] and v1.raw[3] == "<0x00>" and v1.canon[v1.raw.index("▁the")] == " the"
    assert torch.equal(build_map(v1, v1).index, torch.arange(32000))
    forward = build_map(v1, v3)
    assert forward.counts["approx"] == forward.counts["unmapped"] == 0
    assert all(v3.raw[int(forward.index[u])] == v1.raw[u] for u in range(0, 32000, 97))
    back = build_map(v3, v1)  # v3's extra control tokens have no counterpart in v1
    assert back.counts["exact"] == 31741 and back.counts["unmapped"] >= 700
    print("\nv1 -> v3:", forward.counts, f"{forward.meta['seconds']} s", "\nv3 -> v1:", back.counts, f"{back.meta['seconds']} s")


@pytest.mark.slow
def test_mistral_tekken_against_sentencepiece(mistral_data):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    path = mistral_data / "tekken_240911.json"
    tk = load_vocab(path)
    assert torch.equal(build_map(tk, tk).index, torch.arange(len(tk)))
    reference = Tekkenizer.from_file(str(path))  # our pieces are mistral-common's, as text
    the = reference.encode(" the", bos=False, eos=False)
    assert len(the) == 1 and tk.canon[the[0]] == " the"
    v1 = load_vocab(mistral_data / "tokenizer.model.v1")
    start = time.perf_counter()
    m = build_map(v1, tk)
    seconds = time.perf_counter() - start
    c = m.counts
    assert c["exact"] / len(v1) > 0.85 and c["special"] == 3 and c["byte"] == 256 and c["unmapped"] < 10
    assert tk.canon[int(m.index[v1.raw.index("▁the")])] == " the"
    assert_sane_approx(m, v1, tk)
    print(f"\nv1 (32000) -> tekken (131072): {c} in {seconds:.2f} s")


def assert_sane_approx(m, user, delta):
    """A sample of the approximate matches: each is in a prefix relation with its user token."""
    for u in (m.kinds == 4).nonzero().flatten().tolist()[::50]:
        c, d = user.canon[u], delta.canon[int(m.index[u])]
        assert c.startswith(d) or d.startswith(c)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_vocab_map_writes_the_file_and_prints_the_report(toy_tokenizers, tmp_path):
    out = tmp_path / "maps" / "m.safetensors"
    r = runner.invoke(app, ["vocab", "map", "--from", toy_tokenizers[300], "--to", toy_tokenizers[280],
                            "--out", str(out), "--examples", "2"])
    assert r.exit_code == 0, r.output
    m = VocabMap.load(out)
    assert len(m) == 300 and m.meta["delta"]["size"] == 280
    for word in ("exact", "approx", "special", "byte", "unmapped", "built in", "wrote"):
        assert word in r.output
    assert f"approx    {m.counts['approx']:8d}" in r.output


def test_cli_vocab_map_bad_tokenizer_paths(toy_tokenizers, tmp_path):
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["vocab", "map", "--from", str(tmp_path / "missing"), "--to", toy_tokenizers[280],
                            "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())  # rich wraps lines
    (tmp_path / "empty").mkdir()
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    bad_model = tmp_path / "tokenizer.model"
    bad_model.write_bytes(b"garbage, not a protobuf")
    for bad in (tmp_path / "empty", bad_json, bad_model):
        r = runner.invoke(app, ["vocab", "map", "--from", toy_tokenizers[300], "--to", str(bad), "--out", str(out)])
        assert r.exit_code == 2 and "could not be loaded" in " ".join(r.output.split()), r.output
    assert not out.exists()


def test_paths_and_tokenizer_objects_give_the_same_vocab(toy_tokenizers):
    from transformers import AutoTokenizer
    path = toy_tokenizers[280]
    objs = [load_vocab(path), as_vocab(AutoTokenizer.from_pretrained(path)),
            load_vocab(Path(path) / "tokenizer.json")]
    assert len({v.fingerprint for v in objs[:2]}) == 1
    assert objs[2].canon == objs[0].canon  # a bare tokenizer.json has no roles, but the same tokens
