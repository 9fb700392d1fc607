"""How calibration data reaches the model: dataset files, tokenization, and the layer-by-layer
runner that keeps one decoder layer (plus one batch of activations) in memory at a time.

The statistics it records are plain tensors; the algorithms that use them are in
`recipe_runner.quant`.
"""
