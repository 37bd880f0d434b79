"""Run: .venv/bin/python docs/results/validation/rules_knowledge.py TASK METHOD,METHOD,...
(TASK: qa or summ). qa and summ validation: does a rule keep what the large model knows? 'knows': the large base's
first line contains the gold answer (qa) / the town's country (summ). Per rule: exact (qa) or
country present (summ), overall and on the questions the large base knows."""
import json, sys, torch, re
torch.set_num_threads(1)
from logitfusion.bench import zoo
from logitfusion.engine.fuser import Fuser
B = zoo.BUNDLED
methods = sys.argv[2].split(",")
task = sys.argv[1]
rows = [json.loads(l) for l in open(B / f"data/{task}/validation.jsonl")]
f = Fuser.from_recipe({"large": {"path": str(B / "models/large")}, "small": {"path": str(B / "models/small")},
                       "experts": [{"name": task, "path": str(B / f"experts/{task}")}], "solver": {"kind": "dynamic"}})
out = {}
for m in ["large"] + methods:
    gens = f.generate([r["prompt"] for r in rows], solver=m, max_new_tokens=32, stop=["\n"])
    out[m] = [g.text.split("\n")[0].strip() for g in gens]
def gold(r): return r["answer"] if task == "qa" else r["summary"].rsplit(", ", 1)[1].rstrip(".")
def norm(s): return s.strip().rstrip(".").strip()
know = [gold(r) in out["large"][i] for i, r in enumerate(rows)]
print(f"{task}: large base knows {sum(know)}/{len(rows)}")
for m in ["large"] + methods:
    if task == "qa":
        ok = [norm(out[m][i]) == gold(r) for i, r in enumerate(rows)]
        fmt = [len(out[m][i].split()) <= 2 for i in range(len(rows))]
    else:
        ok = [gold(r) in out[m][i] for i, r in enumerate(rows)]
        fmt = [out[m][i].endswith(".") and ", " in out[m][i] for i in range(len(rows))]
    kn = [o for o, k in zip(ok, know) if k]
    print(f"  {m:40s} exact/with-country {100*sum(ok)/len(ok):5.1f}  in format {100*sum(fmt)/len(fmt):5.1f}  "
          f"of the known: {100*sum(kn)/max(1,len(kn)):5.1f}")
    if m != "large":
        ex = [(rows[i]['prompt'][-60:].replace(chr(10),' '), out['large'][i], out[m][i]) for i in range(len(rows)) if know[i] and not ok[i]][:3]
        for e in ex: print("      lost:", e)
