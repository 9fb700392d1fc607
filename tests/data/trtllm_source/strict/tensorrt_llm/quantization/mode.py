# Synthetic fixture (not TensorRT-LLM code).
from enum import auto

from strenum import StrEnum


class QuantAlgo(StrEnum):
    W8A16 = auto()
    W4A16_AWQ = auto()
    FP8 = auto()
    INT8 = auto()


QUANT_ALGO_LIST = list(set(QuantAlgo) - {QuantAlgo.INT8})
KV_CACHE_QUANT_ALGO_LIST = [QuantAlgo.FP8, QuantAlgo.INT8]
