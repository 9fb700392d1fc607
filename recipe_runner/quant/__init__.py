"""Quantization algorithms as pure tensor functions (no I/O, no model loading).

How weights and activations move through memory (calibration, streaming) lives elsewhere:
`recipe_runner.calibration` collects statistics, `recipe_runner.stages.quantize` applies these
functions one weight group at a time.
"""
