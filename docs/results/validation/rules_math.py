"""Run: .venv/bin/python docs/results/validation/rules_math.py -- the first 100 math validation problems:
in format (a closing "The answer is N."), final number right, first step right, both steps right, all right."""
import json, re, torch
torch.set_num_threads(1)
from logitfusion.bench import zoo
from logitfusion.engine.fuser import Fuser
B = zoo.BUNDLED
rows = [json.loads(l) for l in open(B / "data/math/validation.jsonl")][:100]
f = Fuser.from_recipe({"large": {"path": str(B / "models/large")}, "small": {"path": str(B / "models/small")},
                       "experts": [{"name": "math", "path": str(B / "experts/math")}]})
for m in ["expert", "static:1.0", "dynamic", "keep:0.5:0.3:static:1.5", "plausible:expert:0.3:static:1.5"]:
    gens = f.generate([r["prompt"] for r in rows], solver=m, max_new_tokens=48, stop=["\n"])
    final = genuine = fmt = s1 = s2 = 0
    for g, r in zip(gens, rows):
        gold = r["completion"].strip()
        ans = re.findall(r"The answer is (\d+)", gold)[0]
        got = re.findall(r"The answer is (\d+)", g.text)
        fmt += bool(got)
        final += bool(got) and got[0] == ans
        genuine += g.text.strip() == gold
        gs = gold.split(". ")
        st = g.text.strip().split(". ")
        s1 += len(st) > 0 and st[0] == gs[0]
        s2 += len(st) > 1 and st[0] == gs[0] and st[1] == gs[1]
    gold1 = rows[1]['completion'].strip()
    print(f"{m:36s} in format {fmt:3d}  final right {final:3d}  step 1 right {s1:3d}  steps 1-2 right {s2:3d}  all right {genuine:3d}  (of {len(rows)})  gold1 {gold1!r}", flush=True)
