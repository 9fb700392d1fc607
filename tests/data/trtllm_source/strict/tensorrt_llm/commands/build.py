# Synthetic fixture (not TensorRT-LLM code).
import argparse

from tensorrt_llm.builder import BuildConfig
from tensorrt_llm.logger import severity_map
from tensorrt_llm.plugin import add_plugin_argument
from tensorrt_llm.somewhere_else import KindEnum, OTHER_CHOICES


def parse_arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument('--checkpoint_dir', type=str, default=None, help="Checkpoint.")
    parser.add_argument('--max_batch_size', type=int, default=BuildConfig.max_batch_size)
    parser.add_argument('--max_seq_len', '--max_decoder_seq_len', dest='max_seq_len', type=int,
                        default=BuildConfig.max_seq_len, help="Max " "length.")
    parser.add_argument('--output_cache', default=BuildConfig.output_cache)
    parser.add_argument('--kind', type=KindEnum, default=argparse.SUPPRESS)
    parser.add_argument('--other', choices=OTHER_CHOICES, default=BuildConfig.extras)
    parser.add_argument('--log_level', type=str, default='info', choices=severity_map.keys())
    parser.add_argument('--dry_run', default=False, action='store_true')
    lists = parser.add_argument_group("Listing arguments")
    lists.add_argument('--dirs', type=str, default=None, nargs="+")
    plugins = parser.add_argument_group("Plugin config arguments")
    add_plugin_argument(plugins)
    args = parser.parse_args()
    return args
