#!/usr/bin/env python3
"""CPU time of error feedback's GPTQ on llama-s's linears of one layer: one loop per linear (gptq_linear) vs one per
input group (gptq_linears, q/k/v and gate/up stacked). Process CPU seconds per call, 3 calls each, 2 threads.

    python bench/feedback_batch.py
"""
import time, torch
torch.set_num_threads(2)
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.quant.gptq import gptq_linear, gptq_linears
from wqedge.cli import _default_fixture
ck = LlamaCheckpoint.open(_default_fixture("llama-s"))
torch.manual_seed(0)
L = 3
groups = [[f"model.layers.{L}.self_attn.{p}_proj.weight" for p in "qkv"], [f"model.layers.{L}.mlp.gate_proj.weight", f"model.layers.{L}.mlp.up_proj.weight"]]
X = torch.randn(8192, 512) * (torch.rand(512) + 0.2)
xtx = (X.T @ X).double() / 8192
for names in groups:
    ws = [ck.linear_weight(n) for n in names]
    acts = [["q4", "q3", "q2", "q4"] for _ in ws]
    res = {"sep": [], "bat": []}
    for rep in range(3):
        t = time.process_time(); [gptq_linear(w, xtx, a, 128) for w, a in zip(ws, acts)]; res["sep"].append(time.process_time() - t)
        t = time.process_time(); gptq_linears(ws, xtx, acts, 128); res["bat"].append(time.process_time() - t)
    print([n.split(".")[-2] for n in names], "CPU s per call, one loop per linear:", [round(x, 2) for x in res["sep"]],
          "one loop per group:", [round(x, 2) for x in res["bat"]], flush=True)
