# Synthetic fixture (not TensorRT-LLM code).
import argparse
from dataclasses import dataclass, field, fields
from typing import Optional

DTYPE_CHOICES = ["auto", "float16", None]
CHOICES_BY_PLUGIN = {"gemm_plugin": ["auto", "fp8", None]}


@dataclass
class PluginConfig:
    _dtype: str = field(default="float16", init=False)
    _gemm_plugin: Optional[str] = field(default=None, init=False,
                                        metadata={"help": "GEMM plugin."})
    _attention_plugin: Optional[str] = field(default="auto", init=False,
                                             metadata={"help": "Attention plugin."})
    _fused_thing: bool = field(default=True, init=False, metadata={"help": "A feature."})
    _block_size: int = field(default=32, init=False, metadata={"help": "Tokens per block."})


exposed = ["gemm_plugin", "attention_plugin", "fused_thing", "block_size"]


def add_plugin_argument(parser: argparse.ArgumentParser):
    plugin_config = PluginConfig()
    for field in fields(plugin_config):
        field_name = field.name.lstrip('_')
        if field_name not in exposed:
            continue
        help_message = field.metadata["help"]
        if field.type in (str, Optional[str]):
            options = DTYPE_CHOICES
            if field_name in CHOICES_BY_PLUGIN:
                options = CHOICES_BY_PLUGIN[field_name]
            parser.add_argument("--" + field_name,
                                type=str,
                                default=field.default if field.default else "disable",
                                choices=[x if x else "disable" for x in options],
                                help=help_message)
        elif field.type == bool:
            parser.add_argument("--" + field_name,
                                type=str,
                                default="enable" if field.default else "disable",
                                choices=["enable", "disable"],
                                help=f"Whether to enable/disable {field_name}.")
        else:
            parser.add_argument("--" + field_name, type=field.type, default=field.default,
                                help=help_message)
    return parser
