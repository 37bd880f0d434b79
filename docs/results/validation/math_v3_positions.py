"""Run: .venv/bin/python docs/results/validation/math_v3_positions.py [ZOO_ROOT]
Zoo math v3, the first 100 validation problems, teacher-forced: at each position of the gold worked
solution, how often each model or rule puts the gold token first, by kind of position (an operand
copied from the problem, the result of step 1, that result repeated to start step 2, the result of
step 2, the answer repeated, layout). `large FFT` needs ZOO_ROOT/ceilings/math (a zoo build)."""
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitfusion.bench import zoo
from logitfusion.engine import registry
from logitfusion.engine.members import Logits

torch.set_num_threads(1)
B, ROOT = zoo.BUNDLED, Path(sys.argv[1]) if len(sys.argv) > 1 else None
tok = AutoTokenizer.from_pretrained(B / "models/large")
paths = {"large": B / "models/large", "small": B / "models/small", "expert": B / "experts/math"}
if ROOT and (ROOT / "ceilings/math").is_dir():
    paths["large FFT"] = ROOT / "ceilings/math"
models = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in paths.items()}
METHODS = ["static:1.0", "dynamic", "plausible:expert:0.3:static:1.5", "keep:0.5:0.3:static:1.5"] + \
          [f"keep:{b}:{a}:static:1.0" for b in (0.3, 0.5, 0.7, 0.9) for a in (0.6, 0.9)]
solvers = {m: registry.parse_method(m, ["math"]) for m in METHODS}
KINDS = {2: "s", 3: "s again", 5: "r", 6: "answer"}  # by how many numbers come before (else an operand)
ORDER = ["operand", "s", "s again", "r", "answer", "layout"]
right, total = defaultdict(Counter), Counter()
for row in [json.loads(line) for line in open(B / "data/math/validation.jsonl")][:100]:
    p = tok(row["prompt"]).input_ids
    c = tok(row["completion"], add_special_tokens=False).input_ids
    with torch.no_grad():
        z = {n: m(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() for n, m in models.items()}
    top = {n: z[n].argmax(-1) for n in models if n != "small"}
    fused = Logits.of(large=z["large"], small=z["small"], experts=z["expert"][:, None])
    top |= {m: s(fused).logits.argmax(-1) for m, s in solvers.items()}
    for i, t in enumerate(c):
        number = re.fullmatch(r"\s?\d+", tok.decode([t]))
        kind = KINDS.get(len(re.findall(r"\d+", tok.decode(c[:i]))), "operand") if number else "layout"
        total[kind] += 1
        for n, argmax in top.items():
            right[n][kind] += int(argmax[i] == t)
print(f"{'':34s}" + "".join(f"{k:>9s}" for k in ORDER) + "  product (3 operands)")
for n in right:
    acc = {k: right[n][k] / total[k] for k in ORDER}
    product = acc["operand"] ** 3 * acc["s"] * acc["s again"] * acc["r"] * acc["answer"]
    print(f"{n:34s}" + "".join(f"{100 * acc[k]:9.1f}" for k in ORDER) + f"  {100 * product:6.1f}")
