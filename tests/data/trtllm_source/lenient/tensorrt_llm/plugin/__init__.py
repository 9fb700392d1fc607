# Synthetic fixture (not TensorRT-LLM code).
from .plugin import PluginConfig, add_plugin_argument
