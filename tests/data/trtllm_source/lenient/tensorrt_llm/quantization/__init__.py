# Synthetic fixture (not TensorRT-LLM code).
from .mode import KV_CACHE_QUANT_ALGO_LIST, QuantAlgo
