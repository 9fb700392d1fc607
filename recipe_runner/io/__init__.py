"""Format-neutral file I/O below hf/ and trtllm/: streaming safetensors writing."""
