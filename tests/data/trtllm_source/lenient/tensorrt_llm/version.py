# Synthetic fixture for tests/test_trtllm_release_facts.py, written for recipe-runner.
# It imitates the layout the generator reads; it is not TensorRT-LLM code.
__version__ = "9.2.0"
