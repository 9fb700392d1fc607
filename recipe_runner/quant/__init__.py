"""Quantization algorithms as pure tensor functions (no I/O, no model loading).

`algorithms.py` is the table of algorithms (the facts every format branches on), `projection.py` the
one quantizer of a projection that both the quantize stage and the HF exports lay out. How weights
and activations move through memory (calibration, streaming) lives elsewhere:
`recipe_runner.calibration` collects statistics, `recipe_runner.stages.quantize` and
`recipe_runner.hfexport.export` apply the quantizer one weight group at a time.
"""
