"""The `logitfusion` command line: the Typer app and its command table. Each command lives in the
module of its group (generate, evaluate, train, convert, bench) and only parses options, calls the
library and prints; `common` holds what they share."""

from __future__ import annotations

import typer

from . import bench, convert, evaluate, generate, real, train

app = typer.Typer(help="Fuse small fine-tuned experts into a large model's logits at every decoding step.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _quiet() -> None:
    """Library progress bars and deprecation chatter would drown our own progress output."""
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _group(name: str, help: str) -> typer.Typer:
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


# The command table, in the order `logitfusion --help` lists it: commands, then groups.
app.command()(generate.generate)
app.command()(bench.demo)
app.command()(generate.version)
app.command()(generate.serve)
app.command("eval")(evaluate.eval_)
app.command()(train.finetune)
app.command()(train.merge)
app.command()(convert.convert)

recipe_app = _group("recipe", "Write and check fusion recipes.")
recipe_app.command("check")(generate.recipe_check)
recipe_app.command("init")(generate.recipe_init)

bench_app = _group("bench", "Benchmarks that print ratios measured in one run.")
bench_app.command("speed")(bench.bench_speed)
bench_app.command("paper")(bench.bench_paper)
bench_app.command("cmc")(bench.bench_cmc)

vocab_app = _group("vocab", "Map one tokenizer's vocabulary onto another's (PM-MinED, method.md §8).")
vocab_app.command("map")(convert.vocab_map)

delta_app = _group("delta", "Cross-model control: train a tiny delta model beside a frozen template LLM (method.md §7).")
delta_app.command("train")(train.delta_train)

zoo_app = _group("zoo", "The bundled tiny model family, trained by the project on a synthetic world.")
zoo_app.command("build")(bench.zoo_build)
zoo_app.command("info")(bench.zoo_info)

real.register(app, bench_app)  # `real build`, `real demo`, `bench real` (docs/real.md)
