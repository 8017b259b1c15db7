"""How the KV cache quantizer was chosen (issue 15): perplexity of the unquantized llama-s (fp16 weights, PyTorch) with
its K/V fake-quantized per token and head by every variant the runtime could implement: 8/4 bits, asymmetric (fp16
scale and min) vs symmetric (fp16 scale), groups of 32 vs one group per head (64), no rotation vs a Hadamard on K vs on
K and V (wqedge.kvquant). Prints one line per variant (bench/results/kv_cache_choice.txt); bench/kv_cache.py repeats
the 4-bit comparison on the W4 file.

    python bench/kv_cache_choice.py [WINDOWS]     # first WINDOWS (default 8) windows of 512 tokens of eval.txt
"""
import sys
from pathlib import Path

import torch

from wqedge.bench.report import add_fixture_args  # noqa: F401  (the fixture paths below are its defaults)
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.kv_format import KVCacheSpec
from wqedge.kvquant import apply_kv_cache
from wqedge.perplexity import perplexity
from wqedge.reference import logits_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache import eval_tokens  # noqa: E402

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

torch.set_num_threads(2)
M = FIX / "llama-s"
tokens, bos = eval_tokens(M, (FIX / "text" / "eval.txt").read_text())
W = int(sys.argv[1]) if len(sys.argv) > 1 else 8
ckpt = LlamaCheckpoint.open(M)
base = perplexity(logits_fn(ckpt.load_hf_model()), tokens, bos, 512, W).perplexity
print("float", base, flush=True)
for bits in (4, 8):
    for sym in (False, True):
        for g in (32, 0):
            for rot, rv in (("none", False), ("hadamard", False), ("hadamard", True)):
                if bits == 8 and (g == 0 or sym) and rot != "hadamard":
                    continue
                s = KVCacheSpec(bits, rot, symmetric=sym, group_size=g, rotate_values=rv)
                p = perplexity(logits_fn(apply_kv_cache(ckpt.load_hf_model(), s)), tokens, bos, 512, W).perplexity
                print(f"bits {bits} {'sym ' if sym else 'asym'} g {g or 'hd'} rot {rot:8s} V {'rot' if rv else 'plain'}: "
                      f"{p:.4f} {100 * (p / base - 1):+.3f}%", flush=True)
