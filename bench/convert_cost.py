#!/usr/bin/env python3
"""What one `wqedge convert` costs, stage by stage (issue 13: "conversion in minutes"), and what an earlier commit
cost on the same machine in the same run.

    python bench/convert_cost.py [MODEL] [--calib FILE] [--bits 4.25] [--rev REV ...] [--src NAME=DIR ...]
        [--rounds 1] [--threads 2] [--args NAME=ARGS ...]

Each round converts MODEL (default: the fixture llama-s) once with the working tree and once with every --rev (a
git worktree of that commit under a temporary folder; it uses this tree's NeUQI kernel library when its own is not
built), in turn, so machine load falls on all alike; every --args NAME="..." also converts with the working tree and those extra
convert options (e.g. --args distill="--distill"), to price one option. Without --calib the conversion self-calibrates (the default
pipeline); with it, planning and error feedback read the file. Reported per run: wall seconds of each stage as the
CLI prints them (sampling, input statistics, gradients, damage table, plan total, until written; fitting = until
written - plan - sampling; total includes the start-up) and
peak RSS; then, per stage, the ratio of the working tree to the first --rev (best of rounds). Target (issue 13):
llama-s with calibration <= 90 s on 2 cores. No assertions: this is a benchmark.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (stage, pattern of the CLI line holding its seconds)
STAGES = (("sampling", r"sampled \d+ tokens in ([\d.]+) s"),
          ("inputs", r"statistics: inputs ([\d.]+) s"),
          ("gradients", r"statistics: inputs [\d.]+ s, gradients ([\d.]+) s"),
          ("damage table", r"damage table: \d+ units x \d+ actions in ([\d.]+) s"),
          ("distill", r"distillation: ([\d.]+) s, peak memory"),     # --distill's stage (a part of fitting)
          ("plan", r"plan: [\d.]+ effective bits, predicted damage [\d.]+ nats, ([\d.]+) s"),
          ("until written", r"wrote .* in ([\d.]+) s"))   # from the command's start


def _worktree(rev: str, where: Path) -> Path:
    path = where / f"rev-{rev}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def _importable(src: Path) -> Path:
    """`src` as a package root: converters/ and runtime/ reachable as wqedge.converters / wqedge.runtime (the
    install maps them so; a plain source tree needs the links)."""
    for sub in ("converters", "runtime"):
        link = src / "wqedge" / sub
        if not link.exists():
            link.symlink_to(Path("..") / sub)
    return src


def convert_once(src: Path, model: str, out: Path, calib: str | None, bits: float, threads: int,
                 extra: tuple[str, ...] | list[str] = (), nproc: int = 1) -> dict:
    """One `wqedge convert` of `model` with the code in `src`: stage seconds, total, peak RSS (MiB). nproc > 1: under
    torchrun with that many processes and --distributed (docs/distributed.md), `threads` each; the peak RSS is then
    the largest of the processes' (wait4 reports the maximum over the waited-for process tree)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=str(threads))
    lib = ROOT / "cpp" / "build" / "libwqedge_neuqi.so"
    if not (src / "cpp" / "build" / "libwqedge_neuqi.so").is_file() and lib.is_file():
        env["WQEDGE_NEUQI_LIB"] = str(lib)
    # another tree's code must not be shadowed by an editable install of this one (its finder comes first)
    unshadow = ("sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('_editable')]; "
                if src != ROOT else "")
    cmd = [sys.executable, "-c", f"import sys; {unshadow}sys.path.insert(0, {str(src)!r}); import torch; "
           f"torch.set_num_threads({threads}); import wqedge; assert wqedge.__file__.startswith({str(src)!r}); "
           "from wqedge.cli import main; main()",
           "convert", model, "-o", str(out), "--bits", str(bits), "--no-check"]
    if nproc > 1:   # torchrun runs the same program text as a file
        prog = out.with_suffix(".main.py")
        prog.write_text(cmd[2].replace("; ", "\n") + "\n")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(prog),
               *cmd[3:], "--distributed"]
    if calib:
        cmd += ["--calib", calib]
    cmd += list(extra)
    logf = out.with_suffix(".log")
    t = time.time()
    with open(logf, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out.parent)
        _, status, usage = os.wait4(p.pid, 0)        # this child's own peak RSS
    total = time.time() - t
    log = logf.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert failed ({src}):\n{log[-3000:]}")
    row = {"total": total, "rss_mib": usage.ru_maxrss / 1024}
    for name, pat in STAGES:
        m = re.search(pat, log)
        if m:
            row[name] = float(m.group(1))
    if "until written" in row and "plan" in row:
        row["fitting"] = row["until written"] - row["plan"] - row.get("sampling", 0.0)
    row["ppl_note"] = next((l for l in log.splitlines() if l.startswith("effective bits")), "")
    return row


def main() -> None:
    from wqedge.cli import _default_fixture
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=_default_fixture("llama-s"))
    ap.add_argument("--calib", default=None, help="calibration text (default: self-calibration)")
    ap.add_argument("--bits", type=float, default=4.25)
    ap.add_argument("--rev", action="append", default=[], help="also convert with this commit (repeatable)")
    ap.add_argument("--src", action="append", default=[], metavar="NAME=DIR",
                    help="also convert with the code in DIR (a copy of another commit, where git is not at hand)")
    ap.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                    help="also convert with the working tree and these extra convert options (repeatable)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not a.model:
        raise SystemExit("no model given and the fixture llama-s was not found")
    print(f"# bench/convert_cost.py {Path(a.model).name} bits {a.bits} calib {a.calib or 'self'} threads {a.threads}; "
          f"host {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        srcs = {"tree": ROOT, **{rev: _importable(_worktree(rev, tmp)) for rev in a.rev},
                **{n: _importable(Path(d).resolve()) for n, d in (x.split("=", 1) for x in a.src)}}
        refs = a.rev + [x.split("=", 1)[0] for x in a.src]
        extra = {"tree": ()}
        for x in a.args:
            name, args = x.split("=", 1)
            srcs[name], extra[name] = ROOT, tuple(args.split())
            refs.append(name)
        try:
            for rnd in range(a.rounds):
                for name, src in srcs.items():
                    row = convert_once(src, a.model, tmp / f"{name}.gguf", a.calib, a.bits, a.threads,
                                       extra.get(name, ()))
                    cols = ", ".join(f"{k} {row[k]:.1f}" for k, _ in STAGES if k in row)
                    print(f"round {rnd + 1} {name}: total {row['total']:.1f} s ({cols}), peak RSS {row['rss_mib']:.0f} "
                          f"MiB; {row['ppl_note']}", flush=True)
                    b = best.setdefault(name, row)
                    if row["total"] < b["total"]:
                        best[name] = row
        finally:
            for rev in a.rev:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(srcs[rev])],
                               capture_output=True)
    print("\n| stage | " + " | ".join(best) + (f" | tree / {refs[0]} |" if refs else ""))
    print("|---" * (len(best) + 1 + bool(refs)) + "|")
    for key in [k for k, _ in STAGES] + ["fitting", "total", "rss_mib"]:
        vals = [best[n].get(key) for n in best]
        cells = " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
        ratio = ""
        if refs:
            t, r = best["tree"].get(key), best[refs[0]].get(key)
            ratio = f" | {t / r:.2f}" if t and r else " | -"
        print(f"| {key} | {cells}{ratio} |")


if __name__ == "__main__":
    main()
