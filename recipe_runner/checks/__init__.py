"""Every rule a recipe must meet, in one place, as (recipe field, message) findings that the caller
locates (file:line:col) and reports together.

Format modules (trtllm/, hfexport/, quant/, models/) export facts; the modules here turn those facts
into findings. `mapping.py`: tp/pp/embedding split against the model.
"""
