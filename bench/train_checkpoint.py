"""Train a second small LLaMA checkpoint from scratch on a GPU in minutes: a different shape than the fixture.

Quality claims tuned on one model say little (issues 13 and 17), and random weights say nothing about quality.
This script makes "smol-s", a checkpoint shaped like the SmolLM family rather than like the fixture llama-s:

* hidden 576 (not a multiple of G = 128: every linear has a ragged 64-column chunk), 9 query heads and 3
  key/value heads (GQA 3:1), intermediate 1536, tied input/output embeddings;
* a byte-level BPE tokenizer with the GPT-2 pre-tokenizer, shipped only as tokenizer.json (+ config), with
  ChatML specials and chat template (`<|im_start|>`, `<|im_end|>`);
* trained on text that a machine with Python has anyway (the standard library and installed packages'
  sources and documentation), split by file into train / calib / eval so the texts share no document.

    python bench/train_checkpoint.py --out DIR [--minutes 5] [--sources DIR ...]

Writes DIR/smol-s/ (Hugging Face folder, fp16 safetensors shards) and DIR/text/{calib,eval}.txt, with
DIR/smol-s/TRAINING.md saying how it was made and its perplexity. Deterministic given the sources (seeded).
Needs torch with CUDA (or patience on CPU), transformers and tokenizers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

TEXT_SUFFIXES = {".py", ".txt", ".rst", ".md"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus_files(roots: list[Path], max_file_bytes: int = 400_000) -> list[Path]:
    """Text files under the roots, sorted (deterministic), skipping huge and non-UTF-8 ones."""
    out = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.suffix in TEXT_SUFFIXES and p.is_file() and 200 < p.stat().st_size <= max_file_bytes:
                out.append(p)
    return out


def split_of(path: Path) -> str:
    """train / calib / eval by a hash of the file's path: 90 / 5 / 5, no document in two splits."""
    h = int(hashlib.sha1(str(path).encode()).hexdigest(), 16) % 20
    return "calib" if h == 0 else "eval" if h == 1 else "train"


def read_split(files: list[Path], cap_bytes: int) -> str:
    parts, n = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(t)
        n += len(t)
        if n >= cap_bytes:
            break
    return "\n\n".join(parts)


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--sources", nargs="*", default=None, help="folders of text (default: Python's stdlib and "
                    "site-packages)")
    ap.add_argument("--train-mb", type=float, default=60.0)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    mdir, tdir = out / "smol-s", out / "text"
    mdir.mkdir(parents=True, exist_ok=True)
    tdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    roots = [Path(s) for s in args.sources] if args.sources else \
        [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = corpus_files(roots)
    by = {s: [f for f in files if split_of(f) == s] for s in ("train", "calib", "eval")}
    train_text = read_split(by["train"], int(args.train_mb * 2**20))
    (tdir / "calib.txt").write_text(read_split(by["calib"], 2 * 2**20))
    (tdir / "eval.txt").write_text(read_split(by["eval"], 2 * 2**20))
    print(f"corpus: {len(files)} files under {[str(r) for r in roots]}; train {len(train_text) / 2**20:.1f} MiB "
          f"({time.time() - t0:.0f} s)", flush=True)

    tok = train_tokenizer(train_text, args.vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, pad_token="<|endoftext|>", model_max_length=2048)
    fast.chat_template = CHATML
    fast.save_pretrained(mdir)
    tcfg = json.loads((mdir / "tokenizer_config.json").read_text())   # the class name older readers know too
    tcfg.pop("backend", None)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (mdir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    pieces = [train_text[i:i + 200_000] for i in range(0, len(train_text), 200_000)]
    ids = torch.tensor([t for e in tok.encode_batch(pieces) for t in e.ids], dtype=torch.long)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {ids.numel() / 1e6:.1f} M tokens "
          f"({time.time() - t0:.0f} s)", flush=True)

    bos = tok.token_to_id("<|endoftext|>")
    eos = tok.token_to_id("<|im_end|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=bos, eos_token_id=eos, pad_token_id=bos,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=dev == "cuda")
    n_win = ids.numel() // args.seqlen
    windows = ids[: n_win * args.seqlen].view(n_win, args.seqlen).clone()
    windows[:, 0] = bos
    g = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    t_start, step, warm = time.time(), 0, 100
    losses = []
    model.train()
    while True:
        el = time.time() - t_start
        if el >= budget:
            break
        frac = el / budget   # the schedule runs on time, not on a step count guessed from the first steps
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = windows[torch.randint(0, n_win, (args.batch,), generator=g)].to(dev, non_blocking=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            losses.append((step, round(loss.item(), 3)))
            print(f"step {step} loss {float(loss):.3f} lr {lr:.2e} ({time.time() - t_start:.0f} s)", flush=True)
    model.eval()

    # perplexity on eval.txt, the fixture's definition: 512-token windows led by BOS, second half scored
    ev = torch.tensor([bos] + tok.encode((tdir / "eval.txt").read_text()).ids, dtype=torch.long)
    nw = min(32, ev.numel() // 512)
    ew = ev[: nw * 512].view(nw, 512).clone()
    ew[:, 0] = bos
    nll, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, nw, 8):
            x = ew[i:i + 8].to(dev)
            lp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
            tgt = x[:, 257:]
            nll += float(-lp[:, 256:-1].gather(2, tgt[..., None]).sum())
            cnt += tgt.numel()
    ppl = math.exp(nll / cnt) if cnt else float("nan")   # nan: eval.txt shorter than one window
    model.to(torch.float16).save_pretrained(mdir, max_shard_size="12MB")
    cfgj = json.loads((mdir / "config.json").read_text())
    (mdir / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}) + "\n")
    (mdir / "TRAINING.md").write_text(
        f"# smol-s\n\nMade by `python bench/train_checkpoint.py {' '.join(sys.argv[1:])}` on {dev} "
        f"({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}), torch {torch.__version__}.\n\n"
        f"- {n_params / 1e6:.1f} M parameters; hidden {cfgj['hidden_size']}, {cfgj['num_hidden_layers']} layers, "
        f"heads {cfgj['num_attention_heads']}/{cfgj['num_key_value_heads']}, intermediate "
        f"{cfgj['intermediate_size']}, tied embeddings, vocab {cfgj['vocab_size']} (byte-level BPE, GPT-2 "
        f"pre-tokenizer, tokenizer.json only, ChatML template).\n"
        f"- Text: {len(files)} files of {[str(r) for r in roots]}, split by file (sha1 of the path): train "
        f"{ids.numel() / 1e6:.1f} M tokens, ../text/calib.txt and ../text/eval.txt (2 MiB each, held-out files).\n"
        f"- {step} steps of {args.batch} x {args.seqlen} tokens ({step * args.batch * args.seqlen / 1e6:.0f} M "
        f"tokens seen) in {time.time() - t_start:.0f} s; AdamW lr {args.lr} cosine, wd 0.1, bf16 autocast; "
        f"loss every 100 steps: {losses[-5:]}.\n"
        f"- Perplexity on eval.txt ({nw} windows of 512, second half scored, fp32 on {dev} before the fp16 "
        f"save): **{ppl:.3f}**.\n")
    print(f"done: eval perplexity {ppl:.3f}, {n_params / 1e6:.1f} M params, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
