"""GGUF files (llama.cpp, Ollama, LM Studio) as models: the tests write their own tiny GGUFs from the
toy family with the `gguf` package (llama tensor names, q/k rows permuted as llama.cpp's converter
does, the tokenizer as metadata), then load them as fusion members, in eval and in the server, convert
them to safetensors, and feed the loader every kind of bad file."""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from logitfusion.cli import app
from logitfusion.engine.fuser import Fuser
from logitfusion.engine.models import LoadError, LoadOptions, VocabularyMismatchError


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


runner = CliRunner()
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
TEXT = "Question: 3 plus 4? Answer: the cat sells apples, héllo ☃ </s> <s>"
PROMPTS = ["Question: 2 plus 3? Answer:", "the cat sells"]

_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows in interleaved rotary order; transformers' reader undoes exactly this
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model):
    c = model.config
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name in _TOP_NAMES:
            yield _TOP_NAMES[name], a
            continue
        layer, key = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if key == "self_attn.q_proj":
            a = _permute(a, c.num_attention_heads)
        elif key == "self_attn.k_proj":
            a = _permute(a, c.num_key_value_heads)
        yield f"blk.{layer}.{_LAYER_NAMES[key]}.weight", a


def _write_tokenizer(w, tok, chat_template):
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    special = set(tok.all_special_tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def write_gguf(model_dir, out, qtype="F32", arch="llama", chat_template=CHAT, raw_tensor=None, tokenizer=True):
    """The toy Llama in `model_dir` as a GGUF, its 2-D weights stored as `qtype` (norms stay F32,
    as llama.cpp keeps them). raw_tensor=(name, bytes, ggml type) adds one tensor written as is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    c, q = model.config, gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("toy")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        _write_tokenizer(w, AutoTokenizer.from_pretrained(str(model_dir)), chat_template)
    for name, a in _tensors(model):
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
    if raw_tensor:
        w.add_tensor(raw_tensor[0], raw_tensor[1], raw_dtype=raw_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(out)


@pytest.fixture(scope="module")
def ggufs(family, tmp_path_factory):
    """large.gguf (F32, with a chat template), expert1/ (a folder holding expert1.gguf), large-q8.gguf."""
    root = tmp_path_factory.mktemp("gguf")
    (root / "expert1").mkdir()
    return {"large": write_gguf(family["large"], root / "large.gguf"),
            "expert1": str(Path(write_gguf(family["experts"]["expert1"], root / "expert1" / "expert1.gguf")).parent),
            "large_f16": write_gguf(family["large"], root / "large-f16.gguf", "F16"),
            "large_q8": write_gguf(family["large"], root / "large-q8.gguf", "Q8_0"),
            "root": root}


@pytest.fixture(scope="module")
def gguf_fuser(family, ggufs):
    return Fuser.from_pretrained(ggufs["large"], family["small"], {"expert1": ggufs["expert1"]})


@torch.no_grad()
def _logits(model, tok, text=TEXT):
    return model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0].float()


# ---------------------------------------------------------------- the round trip

def test_a_gguf_loads_as_the_model_it_was_written_from(family, ggufs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfusion.engine.models import load_gguf
    ref, ref_tok = AutoModelForCausalLM.from_pretrained(family["large"]).eval(), AutoTokenizer.from_pretrained(family["large"])
    model, tok = load_gguf(ggufs["large"], "large", LoadOptions())
    assert tok.get_vocab() == ref_tok.get_vocab() and len(tok) == len(ref_tok)  # no extra <|endoftext|>
    assert tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]
    assert tok.chat_template == CHAT
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    assert torch.allclose(_logits(model, tok), _logits(ref, ref_tok), atol=1e-5)
    half, _ = load_gguf(ggufs["large_f16"], "large", LoadOptions(dtype="auto"))  # auto: the file's float type
    assert half.dtype == torch.float16
    q8, _ = load_gguf(ggufs["large_q8"], "large", LoadOptions())
    assert all(type(m).__name__ != "GgufLinear" for m in q8.modules())  # dequantised: plain Linear layers
    want = ref.state_dict()
    for name, w in q8.state_dict().items():  # 8-bit blocks: each value within half a step of its block's scale
        assert (w - want[name]).abs().max() <= want[name].abs().max() / 127 * 0.51 + 1e-6, name


def test_gguf_large_and_expert_fuse_as_their_directories_do(gguf_fuser, fuser1):
    for solver in ("dynamic", "static:1.0"):
        a = gguf_fuser.generate(PROMPTS, solver=solver, max_new_tokens=8)
        b = fuser1.generate(PROMPTS, solver=solver, max_new_tokens=8)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_recipe_and_cli_take_gguf_paths(family, ggufs, fuser1, tmp_path):
    recipe = tmp_path / "fusion.yaml"  # relative paths resolve against the recipe's folder, .gguf too
    recipe.write_text(yaml.safe_dump({"large": {"path": os.path.relpath(ggufs["large"], tmp_path)},
                                      "small": {"path": family["small"]},
                                      "experts": [{"name": "expert1", "path": ggufs["expert1"]}]}))
    res = runner.invoke(app, ["recipe", "check", str(recipe), "--load"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "--large", ggufs["large"], "--small", family["small"],
                              "--expert", f"expert1={ggufs['expert1']}", "--max-new-tokens", "6",
                              "--prompt", PROMPTS[0]])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == fuser1.generate(PROMPTS[:1], max_new_tokens=6)[0].text.strip()


# ---------------------------------------------------------------- eval and serve

def test_eval_with_gguf_members(family, ggufs, gguf_fuser, fuser1, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance

    from logitfusion.eval.lm import FusedLM, task_manager
    reqs = [Instance("loglikelihood", {}, (p, " 5"), i) for i, p in enumerate(PROMPTS)]
    ours, theirs = FusedLM(fuser=gguf_fuser, batch_size=2), FusedLM(fuser=fuser1, batch_size=2)
    assert np.allclose([r[0] for r in ours.loglikelihood(reqs)], [r[0] for r in theirs.loglikelihood(reqs)],
                       atol=1e-4)
    out = simple_evaluate(model=ours, task_manager=task_manager(["toy_sums"]), limit=3,
                          tasks=["toy_sums_mc"], bootstrap_iters=0)
    assert 0 <= out["results"]["toy_sums_mc"]["acc,none"] <= 1


def test_serve_with_gguf_members(gguf_fuser, fuser1):
    from test_server import KEY, Server

    from logitfusion.serve import create_app
    with Server(create_app({"fusion": gguf_fuser}, api_key=KEY)) as server:
        client = server.client()
        done = client.completions.create(model="fusion", prompt=PROMPTS[0], max_tokens=6)
        assert done.choices[0].text == fuser1.generate(PROMPTS[:1], max_new_tokens=6)[0].text
        chat = client.chat.completions.create(model="fusion", max_tokens=4,
                                              messages=[{"role": "user", "content": "the cat"}])
        # the GGUF's chat template: the prompt the server decoded is the template's rendering
        want = gguf_fuser.generate(["<user>the cat</s><assistant>"], max_new_tokens=4)[0].text
        assert chat.choices[0].message.content == want


# ---------------------------------------------------------------- convert

def test_convert_writes_a_plain_safetensors_directory(family, ggufs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", ggufs["large"], str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.gguf")) and "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = AutoModelForCausalLM.from_pretrained(str(out)).eval(), AutoTokenizer.from_pretrained(str(out))
    ref, ref_tok = AutoModelForCausalLM.from_pretrained(family["large"]).eval(), AutoTokenizer.from_pretrained(family["large"])
    assert tok.chat_template == CHAT and tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]
    assert torch.allclose(_logits(model, tok), _logits(ref, ref_tok), atol=1e-5)

    res = runner.invoke(app, ["convert", ggufs["large"], str(out)])  # not empty now
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["convert", ggufs["large_f16"], str(out), "--overwrite", "--dtype", "float16"])
    assert res.exit_code == 0, res.output
    assert AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").dtype == torch.float16
    assert "GGUF" in runner.invoke(app, ["convert", "--help"]).output


# ---------------------------------------------------------------- bad input

def _load_error(path, family, small=True):
    with pytest.raises(LoadError) as e:
        Fuser.from_pretrained(str(path), family["small"] if small else None)
    assert "Traceback" not in str(e.value)
    return str(e.value)


def test_unsupported_architecture(family, tmp_path):
    path = write_gguf(family["large"], tmp_path / "rwkv.gguf", arch="rwkv6")
    msg = _load_error(path, family)
    assert "rwkv.gguf" in msg and "architecture 'rwkv6'" in msg and "llama" in msg


def test_unsupported_quantisation(family, tmp_path):
    # Q8_1 is a ggml type (llama.cpp's intermediate for dot products) that the gguf package cannot
    # dequantise: one block of 32 values, 40 bytes
    path = write_gguf(family["large"], tmp_path / "q81.gguf",
                      raw_tensor=("extra.weight", np.zeros((1, 40), np.uint8), gguf.GGMLQuantizationType.Q8_1))
    msg = _load_error(path, family)
    assert "q81.gguf" in msg and "Q8_1" in msg and "another quantisation" in msg


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the tensor data, cut in the metadata
def test_truncated_file(ggufs, family, tmp_path, keep):
    data = Path(ggufs["large"]).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    msg = _load_error(path, family)
    assert "cut.gguf" in msg and "truncated" in msg and "again" in msg


def test_tokenizer_disagreeing_with_the_other_members(family, other_vocab_small, tmp_path):
    path = write_gguf(other_vocab_small, tmp_path / "other.gguf")
    with pytest.raises(VocabularyMismatchError) as e:
        Fuser.from_pretrained(path, family["small"])
    assert "different vocabularies" in str(e.value) and "mapping" in str(e.value)
    with pytest.raises(VocabularyMismatchError):  # a GGUF expert is checked too
        Fuser.from_pretrained(family["large"], family["small"], {"e": path})


def test_other_bad_gguf_inputs(family, ggufs, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert "not a GGUF file" in _load_error(fake, family)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(Path(ggufs["large"]).read_bytes())
    assert "2 GGUF files" in _load_error(two, family) and "name the one" in _load_error(two, family)
    split = tmp_path / "m-00001-of-00002.gguf"
    split.write_bytes(b"GGUF")
    assert "split GGUF" in _load_error(split, family)
    bare = write_gguf(family["large"], tmp_path / "bare.gguf", tokenizer=False)
    assert "has no tokenizer" in _load_error(bare, family)
    res = runner.invoke(app, ["generate", "--large", ggufs["large"], "--device-map", "auto", "--prompt", "x"])
    assert res.exit_code == 2 and "logitfusion convert" in res.output
