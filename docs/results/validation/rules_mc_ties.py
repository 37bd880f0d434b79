"""Run: .venv/bin/python docs/results/validation/rules_mc_ties.py [SPLIT]
How often a masking rule (plausible, keep) gives every choice of a multiple-choice item -inf, a tie
that lm-eval's argmax breaks by position (the first choice), on the zoo's truthful and mmlu items;
and how many of those tied items were counted right (their gold is the first choice)."""
import json
import math
import sys

import torch

from logitfusion.bench import world, zoo
from logitfusion.engine.recipe import Recipe
from logitfusion.eval.lm import FusedLM

torch.set_num_threads(1)
B, SPLIT = zoo.BUNDLED, sys.argv[1] if len(sys.argv) > 1 else "validation"
SINGLE = ["plausible:expert:0.3:static:1.5", "keep:0.5:0.3:static:1.5", "keep:0.3:0.3:static:1.5",
          "keep:0.3:0.1:static:1.5", "keep:0.7:0.9:static:1.0"]
MULTI = ["keep:0.3:0.3:static:0.25"]


def recipe(experts):
    return Recipe.from_dict({"large": {"path": str(B / "models/large")}, "small": {"path": str(B / "models/small")},
                             "experts": [{"name": e, "path": str(B / f"experts/{e}")} for e in experts]})


for task in ("truthful", "mmlu"):
    rows = [json.loads(line) for line in open(B / f"data/{task}/{SPLIT}.jsonl")]
    for experts, methods in (([task], SINGLE), (list(world.SEEN_TASKS), MULTI)):
        lm = FusedLM(recipe=recipe(experts))
        for m in methods:
            lm.set_method(m)
            tied = tied_right = 0
            for r in rows:
                scores = [lm._loglikelihood([r["prompt"]], [lm._encode_pair(r["prompt"], " " + c)[1]])[0][0]
                          for c in r["choices"]]
                if all(math.isinf(s) for s in scores):
                    tied += 1
                    tied_right += r["gold"] == 0
            label = m if len(experts) == 1 else f"4 experts: {m}"
            print(f"{task} {SPLIT} {label}: all choices -inf on {tied}/{len(rows)}, "
                  f"of which counted right {tied_right}", flush=True)
