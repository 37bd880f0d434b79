"""Routing signals on the zoo validation split (issue 24): at each position of the gold completion
(teacher-forced), which of the four seen-task experts each signal ranks first; printed: the share of
positions where that is the task's own expert (first position, all positions). toward =
E_P[log Q_t - log Q] (rules.toward); kl = KL(Q_t||Q) (the paper's target); neg_ent = -H(Q_t);
gold = the expert that raises the gold token most (an oracle); paper = the expert the paper's fast
search gives a non-zero weight; cos = cosine of the expert's shift with the large model's.
Run: .venv/bin/python docs/results/validation/rules_routing.py 30
"""
"""Routing signals on the zoo validation split (issue 24): for each position of the gold completion
(teacher-forced), which of the four seen-task experts each signal ranks first; the share of
positions where that is the task's own expert (first position, all positions).
Run: .venv/bin/python docs/results/validation/rules_routing.py 30"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from logitfusion.bench import zoo
from logitfusion.engine.fusion import grid_search, one_expert_candidates
torch.set_num_threads(1)
B = zoo.BUNDLED
tok = AutoTokenizer.from_pretrained(B / "models/large")
load = lambda p: AutoModelForCausalLM.from_pretrained(B / p).eval()
L, S = load("models/large"), load("models/small")
SEEN = ["math", "truthful", "qa", "summ"]
E = [load(f"experts/{t}") for t in SEEN]
n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
grid = torch.tensor([round(0.1 * i, 1) for i in range(21)])
cands = one_expert_candidates(grid, 4)
res = {}
for ti, task in enumerate(SEEN):
    rows = [json.loads(l) for l in open(B / f"data/{task}/validation.jsonl")][:n]
    stats = {k: [0, 0, 0, 0] for k in ("toward", "kl", "neg_ent", "gold", "paper", "cos", "tw+ent", "tw+.3ent")}  # first-right, first-n, all-right, all-n
    for r in rows:
        p_ids = tok(r["prompt"])["input_ids"]; ids = tok(r["prompt"] + r["completion"])["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            zl, zs = L(x).logits[0].float(), S(x).logits[0].float()
            ze = torch.stack([e(x).logits[0].float() for e in E], 1)  # [N, T, V]
        pos = list(range(len(p_ids) - 1, len(ids) - 1))
        zl, zs, ze = zl[pos], zs[pos], ze[pos]
        gold = torch.tensor(ids[len(p_ids):])
        lp, lq, lqt = zl.log_softmax(-1), zs.log_softmax(-1), ze.log_softmax(-1)
        P = lp.exp()
        toward = (P[:, None] * (lqt - lq[:, None])).sum(-1)  # E_P[log Qt - log Q] [N, T]
        kl = (lqt.exp() * (lqt - lq[:, None])).sum(-1)
        neg_ent = (lqt.exp() * lqt).sum(-1)
        goldsc = (lqt - lq[:, None]).gather(-1, gold[:, None, None].expand(-1, 4, 1))[..., 0]
        w, _ = grid_search(zl, zs, ze, cands)
        d = lqt - lq[:, None]  # [N, T, V]
        g = (lp - lq)[:, None]
        wts = ((P + lq.exp()) / 2)[:, None]
        def cen(x): return x - (wts * x).sum(-1, keepdim=True)
        dc, gc = cen(d), cen(g)
        cos = (wts * dc * gc).sum(-1) / ((wts * dc * dc).sum(-1).sqrt() * (wts * gc * gc).sum(-1).sqrt() + 1e-9)
        paper = w  # nonzero column = chosen expert (all zero -> none)
        for k, sc in (("toward", toward), ("kl", kl), ("neg_ent", neg_ent), ("cos", cos), ("tw+ent", toward + neg_ent), ("tw+.3ent", toward + 0.3 * neg_ent), ("gold", goldsc), ("paper", paper)):
            pick = sc.argmax(-1)
            right = (pick == ti)
            if k == "paper":
                right = right & (sc.amax(-1) > 0)
            stats[k][0] += int(right[0]); stats[k][1] += 1
            stats[k][2] += int(right.sum()); stats[k][3] += len(right)
    res[task] = {k: (f"{100*v[0]/v[1]:.0f}%", f"{100*v[2]/v[3]:.0f}%") for k, v in stats.items()}
    print(task, res[task], flush=True)
