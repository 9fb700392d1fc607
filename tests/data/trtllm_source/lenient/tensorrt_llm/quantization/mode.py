# Synthetic fixture (not TensorRT-LLM code).
from enum import Enum


class QuantAlgo(str, Enum):
    W8A16 = "W8A16"
    W4A16_AWQ = "W4A16_AWQ"
    FP8 = "FP8"
    NVFP4 = "NVFP4"


KV_CACHE_QUANT_ALGO_LIST = [QuantAlgo.FP8, QuantAlgo.NVFP4]
