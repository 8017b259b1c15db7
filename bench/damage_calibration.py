"""Does the knapsack gain from per-action calibration of its damage table? (issue 17; a negative result)

    python bench/damage_calibration.py [BUDGET]          # llama-s, default 2.5 bits; ~10 min on 2 CPU cores

Per action, the uniform plan's measured held-out loss increase after error-feedback conversion (16 feedback windows,
16 held-out windows; wqedge.alloc.measure.ConvertedPlanLoss) over its predicted damage gives a ratio; the greedy
knapsack then runs on the table with every action's damage times its ratio, and both plans (plain and corrected) are
converted with the default CPU feedback windows and scored on 32 windows of eval.txt. Results and reading:
bench/results/allocation.md, "Per-action damage calibration". (The q8 ratio is noise around zero, even negative; the
plans never take q8 at these budgets, so it was left as measured.)"""
import copy, sys, time, torch, numpy as np
from pathlib import Path
from transformers import AutoTokenizer
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.alloc.planner import prepare, plan_from_choice
from wqedge.alloc.measure import ConvertedPlanLoss
from wqedge.alloc.greedy import greedy_allocate
from wqedge.quant.feedback import quantize_model, feedback_windows
from wqedge.calib import calibration_tokens, tokenize_text
from wqedge.perplexity import perplexity
M = "/work/shared/fixtures/llama-s"; T = "/work/shared/fixtures/text/"
ck = LlamaCheckpoint.open(M); calib = Path(T + "calib.txt").read_text()
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 2.5
t0 = time.time()
table, ctx = prepare(ck, 128, calib, 0, "cpu", progress=False, n_heldout=16, full_xtx=True)
print("prepare", round(time.time() - t0), "actions", table.actions, flush=True)
conv = ConvertedPlanLoss(ctx.model, ctx.calib.train[:16], ctx.calib.heldout, "cpu", original=ck.linear_weight)
ratio = np.ones(len(table.actions))
for ai, a in enumerate(table.actions):
    if a == "fp16":
        continue
    ch = np.full(len(table.units), ai)
    pred = table.plan_damage(ch)
    meas = float(conv(plan_from_choice(ck, table, ch, 16, "greedy")).mean())
    ratio[ai] = meas / pred
    print(f"{a}: predicted {pred:.4f} measured {meas:.4f} ratio {ratio[ai]:.3f}", flush=True)
tok = AutoTokenizer.from_pretrained(M, local_files_only=True)
ev = tokenize_text(tok, Path(T + "eval.txt").read_text(), 1)
fb = calibration_tokens(tok, calib, feedback_windows("cpu"), 512, 0, bos_id=1, seed=0).train
model = ctx.model
w0 = {l.hf_name: model.get_parameter(l.hf_name).detach().clone() for l in ck.spec.linears()}
def ppl(plan):
    for n, w in w0.items(): model.get_parameter(n).data.copy_(w)
    quantize_model(model, plan, fb, device="cpu")
    with torch.no_grad():
        r = perplexity(lambda win: model(torch.as_tensor(win, dtype=torch.long)).logits.float().numpy(), ev, 1, 512, 32, batch_size=8).perplexity
    for n, w in w0.items(): model.get_parameter(n).data.copy_(w)
    return r
t2 = copy.copy(table); t2.damage = table.damage * ratio[None, :]
c1 = greedy_allocate(table, budget); c2 = greedy_allocate(t2, budget)
print("units changed", int((c1 != c2).sum()), flush=True)
for name, c in (("plain", c1), ("corrected", c2)):
    p = plan_from_choice(ck, table, c, budget, "greedy")
    hist = {a: int((c == i).sum()) for i, a in enumerate(table.actions)}
    print(name, hist, "bits", round(p.effective_bits(), 4), "ppl", round(ppl(p), 4), flush=True)
