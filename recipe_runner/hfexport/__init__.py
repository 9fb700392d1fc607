"""Quantized Hugging Face checkpoints (ModelOpt unified HF, compressed-tensors) for TensorRT-LLM's
PyTorch backend and vLLM: which recipe combinations each consumer loads (targets.py) and the
export stage that writes them (export.py)."""
