"""wqedge: plan, convert and run column-chunk mixed-precision LLaMA models."""
__version__ = "0.1.0"
