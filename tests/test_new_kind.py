"""Adding a solver kind is one class and one registration: a kind defined here, in a test module,
runs through the library, a recipe, the CLI, eval (lm-eval) and the server without any other
change. The kind, "halfway", is static fusion with one weight for every expert, written as a
function of the step's logits; its answers must be static fusion's to the token."""

from typing import ClassVar, Literal

import pytest
import yaml
from typer.testing import CliRunner

from logitfusion import Fuser
from logitfusion.cli import app
from logitfusion.engine import registry
from logitfusion.engine.fusion import fuse
from logitfusion.engine.registry import MethodContext, SolverSpec
from logitfusion.engine.solvers import Choice, Rule

pytestmark = pytest.mark.slow  # lm-eval and a server end to end

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells"]


class Halfway(SolverSpec):
    """Every expert at weight a (default 0.5)."""

    kind: Literal["halfway"] = "halfway"
    a: float = 0.5
    syntax: ClassVar[str] = "halfway[:a]"
    needs: ClassVar[frozenset[str]] = frozenset({"expert"})

    @classmethod
    def from_method(cls, arg, method, ctx):
        return cls(a=float(arg)) if arg else cls()

    def build(self, ctx: MethodContext):
        def rule(z):
            weights = z.large.new_full(z.experts.shape[:2], self.a)  # [B, T]
            return Choice(fuse(z.large, z.small, z.experts, weights), weights)
        return Rule("halfway", rule)


@pytest.fixture(scope="module", autouse=True)
def halfway():
    registry.register(Halfway)
    yield
    registry.unregister("halfway")


@pytest.fixture(scope="module")
def recipe(family, tmp_path_factory):
    path = tmp_path_factory.mktemp("halfway") / "halfway.yaml"
    path.write_text(yaml.safe_dump({
        "large": {"path": family["large"]}, "small": {"path": family["small"]},
        "experts": [{"name": "expert1", "path": family["experts"]["expert1"]},
                    {"name": "lora1", "path": family["experts"]["lora1"]}],
        "solver": {"kind": "halfway", "a": 0.5}, "generation": {"max_new_tokens": 6}}))
    return path


@pytest.fixture(scope="module")
def fuser(recipe):
    return Fuser.from_recipe(recipe)


def _ids(gens):
    return [g.token_ids for g in gens]


def test_library_and_recipe(fuser):
    assert fuser.recipe.solver == Halfway(a=0.5)
    static = _ids(fuser.generate(PROMPTS, solver="static:0.5"))
    assert _ids(fuser.generate(PROMPTS)) == static  # the recipe's solver section
    assert _ids(fuser.generate(PROMPTS, solver="halfway:0.5")) == static  # the method grammar
    assert _ids(fuser.generate(PROMPTS, solver="halfway:1.5")) == _ids(fuser.generate(PROMPTS, solver="static:1.5"))
    traced = fuser.generate(PROMPTS[:1], trace=True)[0]
    assert traced.weights and all(w == [0.5, 0.5] for w in traced.weights)


def test_cli(fuser, recipe):
    runner = CliRunner()
    for method in ("halfway:0.5", "static:0.5"):
        r = runner.invoke(app, ["generate", "-r", str(recipe), "--solver", method, "-p", PROMPTS[0]])
        assert r.exit_code == 0, r.output
    out = [runner.invoke(app, ["generate", "-r", str(recipe), "--solver", m, "-p", PROMPTS[0]]).stdout
           for m in ("halfway:0.5", "static:0.5")]
    assert out[0] == out[1]
    bad = runner.invoke(app, ["generate", "-r", str(recipe), "--solver", "halfway:x", "-p", PROMPTS[0]])
    assert bad.exit_code != 0 and "halfway:x" in bad.output and "Traceback" not in bad.output


def test_eval(fuser, recipe, tmp_path):
    from logitfusion.eval.records import read_jsonl
    out = tmp_path / "r.jsonl"
    r = CliRunner().invoke(app, ["eval", "-r", str(recipe), "--tasks", "toy_sums_mc", "--methods",
                                 "halfway:0.5,static:0.5", "--limit", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    by_method = {rec["key"].split("|")[0]: rec["value"] for rec in read_jsonl(out)}
    assert by_method["halfway:0.5"] == by_method["static:0.5"]


def test_eval_lm_model(fuser):
    from logitfusion.eval.lm import FusedLM
    from lm_eval.api.instance import Instance
    lm = FusedLM(fuser=fuser, solver="halfway:0.5", batch_size=2)
    requests = [Instance("loglikelihood", {}, (p, " 7"), i) for i, p in enumerate(PROMPTS)]
    new = lm.loglikelihood(requests)
    lm.set_method("static:0.5")
    old = lm.loglikelihood(requests)
    assert [g for _, g in new] == [g for _, g in old]
    assert [lp for lp, _ in new] == pytest.approx([lp for lp, _ in old], abs=1e-5)


def test_server(recipe):
    from test_server import Server  # the suite's real uvicorn server on 127.0.0.1

    from logitfusion.serve import create_app
    app_ = create_app({"fusion": Fuser.from_recipe(recipe)})
    with Server(app_) as server:
        client = server.client(api_key="unused")
        texts = {m: client.completions.create(model="fusion", prompt=PROMPTS[0], max_tokens=6,
                                              extra_body={"fusion": {"solver": m, "return_weights": True}})
                 for m in ("halfway:0.5", "static:0.5")}
        assert texts["halfway:0.5"].choices[0].text == texts["static:0.5"].choices[0].text
        default = client.completions.create(model="fusion", prompt=PROMPTS[0], max_tokens=6)
        assert default.choices[0].text == texts["static:0.5"].choices[0].text
        with server.http() as http:
            r = http.post("/v1/completions", json={"model": "fusion", "prompt": PROMPTS[0],
                                                   "fusion": {"solver": "halfway:x"}})
        assert r.status_code == 400 and "halfway:x" in r.json()["error"]["message"]
