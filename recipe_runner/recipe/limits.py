"""The bounds on what reading one recipe may cost, in one place.

A recipe is untrusted input (a review may run `recipe show` on anyone's file), so
parsing and templating must refuse, with a located one-line error, anything that
would take unbounded time or memory. Real recipes are a few KiB and stay far
below every limit here.
"""
from __future__ import annotations

#: Bytes in one recipe (or base) file; larger files are refused before parsing.
MAX_FILE_BYTES = 1024 * 1024

#: Values (mappings, lists, scalars) built from one YAML file, counting every
#: copy an alias (`*name`) expands to: a "billion laughs" alias bomb stops here.
MAX_YAML_NODES = 100_000

#: Nesting depth of mappings and lists in a YAML file (through aliases too).
MAX_YAML_DEPTH = 64

#: Characters one template may render (the text of one recipe value), and the
#: size of any string, list or mapping a template builds on the way.
MAX_TEMPLATE_OUTPUT = 64 * 1024

#: Wall-clock seconds one recipe value's template may take to render.
MAX_TEMPLATE_SECONDS = 2.0

#: Largest width or precision in a format spec (`'%5d'|format(x)`,
#: `'{:>5}'.format(x)`, `x|center(5)`) and largest count for filters that pad.
MAX_FORMAT_WIDTH = 4096

#: Bits of an integer a template computes (`**` and `*` on integers).
MAX_TEMPLATE_INT_BITS = 4096
