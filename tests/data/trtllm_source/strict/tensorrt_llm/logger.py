# Synthetic fixture (not TensorRT-LLM code).
severity_map = {'error': [1, 2], 'info': [3, 4]}
