"""Lowering a quantized model into files (GGUF, later llama.cpp GGUF and ONNX)."""
