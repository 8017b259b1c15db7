"""`wqedge bench`: our runtime vs llama.cpp vs ONNX Runtime on one machine, in one run (issues #5, #6).

    rows.py     the rows (backend x file recipe) and the presets --rows accepts
    files.py    making and caching each row's file (plans, our GGUFs, llama.cpp GGUFs, ONNX, speed model)
    measure.py  in-process measurements: RSS, prefill/decode timing, triad bandwidth, machine description
    worker.py   one backend timed in its own process (`python -m wqedge.bench.worker JOB`)
    runner.py   one run: files, bandwidth, round-robin timing, rooflines, ratios vs llama.cpp
    report.py   Markdown and JSON
"""
from .rows import ROWS, SETS, parse_rows
from .runner import BenchOptions, run_bench

__all__ = ["ROWS", "SETS", "BenchOptions", "parse_rows", "run_bench"]
