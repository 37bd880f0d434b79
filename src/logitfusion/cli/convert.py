"""convert and vocab map: the commands that turn other formats into ours (GGUF into a safetensors
model directory, a pair of tokenizers into a vocabulary map)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import check_paths, fail, say, timed, user_errors


def convert(
    src: Path = typer.Argument(..., help="A .gguf file (or a folder holding one) from llama.cpp, Ollama or LM Studio."),
    out: Path = typer.Argument(..., help="Output folder: config.json, model.safetensors and the tokenizer files (chat template included)."),
    dtype: str = typer.Option("auto", help="dtype of the written weights: auto (the file's float type; float32 for quantised files), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that is not empty (its old weights are replaced)."),
):
    """Write a GGUF as a plain safetensors model directory. A .gguf also loads directly as
    --large/--small/--expert or in a recipe (dequantised at every load); converting once loads faster,
    needs no `gguf` package, and allows --device-map sharding."""
    from ..engine.models import convert_gguf
    timed(lambda: check_paths({"SRC": src}, {"OUT": out}, folders=("OUT",)))
    _, seconds = timed(lambda: convert_gguf(src, out, dtype=dtype, overwrite=overwrite),
                       on_os_error=f"could not write {str(out)!r}")
    say(f"wrote {out} from {src} ({seconds:.1f} s)")


def vocab_map(
    from_: str = typer.Option(..., "--from", help="The user model's tokenizer: a Hugging Face model or tokenizer folder, a tokenizer.json, a SentencePiece .model or a Mistral tekken .json."),
    to: str = typer.Option(..., "--to", help="The delta (or expert) model's tokenizer, in any of the same forms."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the mapping (.safetensors: index, kinds and a JSON header with both tokenizers' fingerprints)."),
    examples: int = typer.Option(5, help="Examples to print for each kind of match."),
):
    """Map every token of --from onto one token of --to (special/byte, exact, nearest prefix, or unmapped);
    write the mapping and print counts, examples and the time taken."""
    from ..engine.vocab import build_map, load_vocab
    try:
        check_paths({"--from": from_, "--to": to}, {"--out": out})
        user, delta = load_vocab(from_), load_vocab(to)
        start = time.perf_counter()  # the mapping alone, not the tokenizers' loading
        vmap = build_map(user, delta, n_examples=examples)
        vmap.save(out)
        seconds = time.perf_counter() - start
    except user_errors() as e:
        fail(str(e))
    typer.echo(vmap.report())
    for kind in ("exact", "approx", "special", "byte", "unmapped"):
        for u, u_tok, d, d_tok in vmap.examples.get(kind, [])[:examples]:
            shown = f"{d_tok!r} ({d})" if d >= 0 else "-"
            typer.echo(f"  {kind:9s} {u_tok!r} ({u}) -> {shown}")
    say(f"wrote {out} (mapping and saving took {seconds:.2f} s)")
