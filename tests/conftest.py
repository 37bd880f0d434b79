"""Shared fixtures: one toy model family per test session (real Hugging Face directories, built
offline in a few seconds), the Fuser loaded on it, and helpers that run the models by hand."""

import os

# Everything runs offline: set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remote code (only ever loaded by the trust_remote_code test) is copied here, not to ~/.cache,
# and removed when the session ends (a folder was left in /tmp by every test run).
os.environ["HF_MODULES_CACHE"] = __import__("tempfile").mkdtemp(prefix="lf-hf-modules-")
__import__("atexit").register(__import__("shutil").rmtree, os.environ["HF_MODULES_CACHE"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is as fast, and a test run beside a training job (or a
# second test run) does not thrash two cores with four spinning OpenMP threads.
torch.set_num_threads(int(os.environ.get("LOGITFUSION_TEST_THREADS", "1")))

from logitfusion.testing import toy  # noqa: E402
from logitfusion.engine.fuser import Fuser  # noqa: E402

try:  # quieter logs: the weight-loading progress bars of transformers 5
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
    _hf_logging.set_verbosity_error()
except Exception:  # pragma: no cover
    pass

torch.set_num_threads(min(2, torch.get_num_threads()))

EXPERT_NAMES = ("expert1", "expert2", "lora1")


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """{"large", "small", "experts": {"expert1", "expert2", "lora1"}} (paths); plus "tokenizer"."""
    root = tmp_path_factory.mktemp("family")
    fam = toy.build_family(root, n_experts=2, lora=True)
    fam["tokenizer"] = str(root / "tokenizer")
    return fam


@pytest.fixture(scope="session")
def fuser(family):
    """Large + small + expert1, expert2 (full fine-tunes) + lora1 (a LoRA adapter of small)."""
    return Fuser.from_pretrained(family["large"], family["small"],
                                 {name: family["experts"][name] for name in EXPERT_NAMES})


@pytest.fixture(scope="session")
def full_fuser(family):
    """Large + small + two full experts: the small base and both experts run stacked."""
    return Fuser.from_pretrained(family["large"], family["small"],
                                 {"expert1": family["experts"]["expert1"], "expert2": family["experts"]["expert2"]})


@pytest.fixture(scope="session")
def fuser1(family):
    """Large + small + one full expert (proxy-tuning setting)."""
    return Fuser.from_pretrained(family["large"], family["small"], {"expert1": family["experts"]["expert1"]})


@pytest.fixture(scope="session")
def family_tokenizer(family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family["tokenizer"])


@pytest.fixture(scope="session")
def other_vocab_small(tmp_path_factory):
    """A small model with a *different* tokenizer (280 tokens instead of 300)."""
    root = tmp_path_factory.mktemp("other_vocab")
    tok = toy.build_tokenizer(root / "tokenizer", vocab_size=280)
    toy.build_model(root / "small", tok, hidden=48, layers=2, heads=4, seed=20)
    return str(root / "small")


@pytest.fixture(scope="session")
def hf_models(family):
    """Every member loaded independently with plain transformers / PEFT (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path).eval()

    models = {"large": load(family["large"]), "small": load(family["small"]),
              "expert1": load(family["experts"]["expert1"]), "expert2": load(family["experts"]["expert2"])}
    models["lora1"] = PeftModel.from_pretrained(load(family["small"]), family["experts"]["lora1"]).eval()
    return models


@pytest.fixture(scope="session")
def reference_logits(hf_models, family_tokenizer):
    """last_logits(role, prompt, generated_ids) -> [V] logits of the next token, computed by running
    the reference model on the whole sequence (no cache, no padding), sliced to the tokenizer size."""
    vocab = len(family_tokenizer)

    @torch.no_grad()
    def last_logits(role, prompt, generated=()):
        ids = family_tokenizer(prompt)["input_ids"] + list(generated)
        out = hf_models[role](input_ids=torch.tensor([ids]))
        return out.logits[0, -1, :vocab].float()

    return last_logits


def family_root(family) -> Path:
    return Path(family["large"]).parent


def _assert_same_generations(shared, separate):
    """Two decodes of the same prompts agree token for token, and their traced top tokens and
    probabilities too."""
    assert [g.token_ids for g in shared] == [g.token_ids for g in separate]
    for a, b in zip(shared, separate):
        for sa, sb in zip(a.trace, b.trace):
            for role in sa.top:
                # The continuous joint solver turns 1e-7 input noise into slightly different
                # weights, so the fused distribution gets a looser (but still tight) bound.
                atol = 1e-3 if role == "fused" else 1e-5
                (ta, pa), (tb, pb) = zip(*sa.top[role]), zip(*sb.top[role])
                assert torch.allclose(torch.tensor(pa), torch.tensor(pb), atol=atol)
                # Ranks may differ only between entries tied within atol (the joint solver's noise
                # once swapped a 2nd and 3rd token 8e-6 apart): same token set, same prob each.
                assert _same_up_to_ties(dict(sa.top[role]), dict(sb.top[role]), list(ta), list(tb), atol)


def _same_up_to_ties(prob_a: dict, prob_b: dict, ta: list, tb: list, atol: float) -> bool:
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y and not (y in prob_a and x in prob_b and abs(prob_a[x] - prob_a[y]) <= atol
                           and abs(prob_b[x] - prob_b[y]) <= atol):
            return False
    return True


@pytest.fixture(scope="session")
def assert_same_generations():
    """The check that a fast path (shared or stacked forwards) decodes as the plain path does."""
    return _assert_same_generations


@torch.no_grad()
def _run_steps(members, module, prompts, steps=3):
    from logitfusion.engine.context import Context
    ctx, logits = Context.prefill(members, [prompts] * len(members), steps, 300, 0, True, module=module)
    out = [logits]
    for i in range(steps):
        out.append(ctx.step(torch.tensor([5 + i + b for b in range(len(prompts))])))
    return out


@pytest.fixture(scope="session")
def run_steps():
    """run_steps(members, module, prompts, steps=3): prefill token-id prompts (left padded) on
    `module` (None: the members' own), then `steps` cached steps; the logits of each, [G, B, V]."""
    return _run_steps
