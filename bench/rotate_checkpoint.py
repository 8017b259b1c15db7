"""Write a copy of a LLaMA checkpoint with its residual stream rotated (wqedge.residual_rotation), for A/B runs of
the planning benchmarks (bench/distill.py, bench/allocation.py) on the rotated model.

    python bench/rotate_checkpoint.py --model ../shared/fixtures/llama-s --out /tmp/llama-s-rot [--seed 0]

The copy computes the same function (logits equal to float32 rounding; checked here on a few tokens) and is
written in float32 unless --dtype says otherwise, so that only the rotation differs from the source.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    a = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.residual_rotation import ResidualRotation

    ckpt = LlamaCheckpoint.open(a.model)
    spec = ckpt.spec
    rot = ResidualRotation(spec.hidden_size, spec.head_dim, seed=a.seed)
    names = [n for n in ckpt.tensor_names() if n.endswith(".weight")]
    if "lm_head.weight" not in names:
        names.append("lm_head.weight")
    dtype = getattr(torch, a.dtype)
    out = {n: rot.tensor(n, ckpt.get, tied=spec.tie_word_embeddings).to(dtype).contiguous() for n in names}
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.model.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.suffix != ".bin":
            shutil.copy2(f, a.out / f.name)
    cfg = dict(ckpt.config, tie_word_embeddings=False, dtype=a.dtype)
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(out, str(a.out / "model.safetensors"), metadata={"format": "pt"})

    src = ckpt.load_hf_model(torch.float32)
    dst = LlamaCheckpoint.open(a.out).load_hf_model(torch.float32)
    ids = torch.arange(1, 65).reshape(1, -1) % spec.vocab_size
    with torch.no_grad():
        diff = (src(ids).logits - dst(ids).logits).abs().max().item()
    print(f"wrote {a.out} (seed {a.seed}, {a.dtype}); max |logit difference| on 64 tokens: {diff:.2e}")


if __name__ == "__main__":
    main()
