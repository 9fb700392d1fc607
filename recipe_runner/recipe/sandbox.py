"""The bounded Jinja2 sandbox that recipe templates render in (recipe_runner.recipe.template walks a
recipe and renders its strings here).

Jinja's sandbox stops attribute escapes but not resource exhaustion: a template
can ask for a 10**10-character string or loop 10**15 times. `_BoundedSandbox`
refuses, before doing the work, any value larger than MAX_TEMPLATE_OUTPUT, any
format width above MAX_FORMAT_WIDTH, integers above MAX_TEMPLATE_INT_BITS, and
stops every loop iteration, call and operator once the file's templates have run
for MAX_TEMPLATE_SECONDS (see `recipe.limits`).

`render` renders one string within the current time budget; `time_budget` starts one budget that
all the renders inside it share.
"""
from __future__ import annotations

import contextvars
import re
import string
import time
from contextlib import contextmanager
from functools import update_wrapper
from typing import Any, Callable, Iterable, Iterator

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from recipe_runner.recipe.limits import (MAX_FORMAT_WIDTH, MAX_TEMPLATE_INT_BITS, MAX_TEMPLATE_OUTPUT,
                                         MAX_TEMPLATE_SECONDS)

# %-format conversions: "%(name)-08.3f"; the width and precision are what can be huge.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")
_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}  # str methods that pad to an argument

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("template_deadline", default=None)
# Characters printed by `{{ }}` so far in the current value, into {% set %} blocks and macros too
# (their buffers are joined only at the end, after a loop may have filled them for seconds).
_printed: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("template_printed", default=None)


class TemplateLimitError(SecurityError):
    """A template asked for more than `recipe.limits` allows."""


class TemplateTimeout(TemplateLimitError):
    """The file's templates ran out of their time budget."""


# ---- checks ----------------------------------------------------------------------------------


def _tick() -> None:
    """Stop the render once the time budget is spent (called on every loop step, call and operator)."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateTimeout(f"rendering took longer than the limit of {MAX_TEMPLATE_SECONDS:g} s")


def _size(value: Any, limit: int = MAX_TEMPLATE_OUTPUT) -> int:
    """Characters of a string, plus one per item of a container, recursively; stops counting past `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        items: Iterable[Any] = (x for kv in value.items() for x in kv)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        return 1
    total = len(value)
    for item in items:
        if total > limit:
            break
        total += _size(item, limit - total)
    return total


def _check_size(value: Any, what: str = "a value is") -> Any:
    if _size(value) > MAX_TEMPLATE_OUTPUT:
        raise TemplateLimitError(f"{what} larger than the limit of {MAX_TEMPLATE_OUTPUT} characters")
    return value


def _count_printed(value: Any) -> Any:
    """The environment's `finalize`: sees every value a `{{ }}` prints, before it becomes text."""
    printed = _printed.get()
    if printed is not None:
        printed[0] += _size(value)
        if printed[0] > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"the template would print more than the limit of {MAX_TEMPLATE_OUTPUT} characters")
    return value


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_FORMAT_WIDTH:
        raise TemplateLimitError(f"{what} {width} exceeds the limit of {MAX_FORMAT_WIDTH}")


def _check_percent_format(text: str) -> None:
    """`'%0999999999d' % x` would allocate the width before failing anything else."""
    for width, precision in _PERCENT_SPEC.findall(text):
        if "*" in (width, precision):
            raise TemplateLimitError("'*' widths in % formats are not allowed; write the width out")
        for number in (width, precision):
            _check_width(int(number) if number else 0, "format width")


def _check_brace_format(text: str) -> None:
    """`'{:999999999}'.format(x)`; nested `{:{w}}` widths are refused as they are only known late."""
    for _, _, spec, _ in string.Formatter().parse(text):
        if spec and "{" in spec:
            raise TemplateLimitError("nested fields in format specs ({:{w}}) are not allowed; write the width out")
        for number in re.findall(r"\d+", spec or ""):
            _check_width(int(number), "format width")


def _check_repeat(seq: Any, times: Any) -> None:
    if isinstance(times, int) and isinstance(seq, (str, list, tuple)) and times > 0:
        if _size(seq) * times > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"repetition (* {times}) would exceed the limit of {MAX_TEMPLATE_OUTPUT} characters")


def _check_int_bits(bits: int, operator: str) -> None:
    if bits > MAX_TEMPLATE_INT_BITS:
        raise TemplateLimitError(f"{operator} would give an integer larger than the limit of "
                                 f"{MAX_TEMPLATE_INT_BITS} bits")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    _check_size(left, "an operand")
    _check_size(right, "an operand")
    if operator == "*":
        if _is_int(left) and _is_int(right):
            _check_int_bits(left.bit_length() + right.bit_length(), "*")
        _check_repeat(left, right)
        _check_repeat(right, left)
    elif operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        _check_int_bits(left.bit_length() * min(right, MAX_TEMPLATE_INT_BITS + 1), "**")
    elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        if _size(left) + _size(right) > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"+ would give a value larger than the limit of {MAX_TEMPLATE_OUTPUT} characters")
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left)


def _check_join(separator: Any, items: Any) -> None:
    if isinstance(separator, str) and isinstance(items, (list, tuple, str)):
        if len(separator) * len(items) + _size(items) > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"join would give a string longer than the limit of {MAX_TEMPLATE_OUTPUT} characters")


def _check_replace(s: Any, old: Any = "", new: Any = "", count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        hits = s.count(old) if count is None or count < 0 else min(count, s.count(old))
        if len(s) + hits * max(0, len(new) - len(old)) > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"replace would give a string longer than the limit of {MAX_TEMPLATE_OUTPUT} characters")


def _check_method_call(method: Any, args: tuple, kwargs: dict) -> tuple:
    """Pre-checks for the str methods whose result can be far larger than their inputs."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name in _WIDTH_METHODS:
        for arg in (*args, *kwargs.values()):
            _check_width(arg, f"{name} width")
    elif name == "join" and args:
        args = (list(args[0]) if not isinstance(args[0], (list, tuple, str)) else args[0], *args[1:])
        _check_join(owner, args[0])
    elif name == "replace":
        _check_replace(owner, *args, **kwargs)
    elif name in ("translate", "maketrans"):
        raise TemplateLimitError(f"str.{name} is not allowed in recipe templates")
    return args


# ---- filters ---------------------------------------------------------------------------------


def _pre_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width
    if isinstance(per_line, int) and isinstance(s, str):
        _check_width(per_line, "indent width")
        if len(s) + per_line * (s.count("\n") + 1) > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"indent would give a string longer than the limit of {MAX_TEMPLATE_OUTPUT} characters")


def _pre_wordwrap(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *_: Any,
                  **__: Any) -> None:
    if isinstance(wrapstring, str) and isinstance(s, str):
        if len(s) * (len(wrapstring) + 1) > MAX_TEMPLATE_OUTPUT:
            raise TemplateLimitError(f"wordwrap would give a string longer than the limit of {MAX_TEMPLATE_OUTPUT} characters")


def _pre_format(value: Any, *_: Any, **__: Any) -> None:
    if isinstance(value, str):
        _check_percent_format(value)


_FILTER_PRECHECKS: dict[str, Callable[..., None]] = {
    "center": lambda value, width=80, *_, **__: _check_width(width, "center width"),
    "batch": lambda value, linecount=1, *_, **__: _check_width(linecount, "batch size"),
    "slice": lambda value, slices=1, *_, **__: _check_width(slices, "slice count"),
    "indent": _pre_indent,
    "wordwrap": _pre_wordwrap,
    "format": _pre_format,
    "replace": _check_replace,
    "join": lambda value, d="", *_, **__: _check_join(d, value),
}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with the budget checked, its input and result sized, and its own pre-check if any."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # env / eval context first
    precheck = _FILTER_PRECHECKS.get(name)

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if len(args) > skip:
            value = args[skip]
            if isinstance(value, Iterator) and name == "join":  # let the pre-check see its length
                value = list(value)
                args = (*args[:skip], value, *args[skip + 1:])
            _check_size(value, f"the input of filter {name!r} is")
            if precheck is not None:
                precheck(*args[skip:], **kwargs)
        return _check_size(func(*args, **kwargs), f"the result of filter {name!r} is")

    return update_wrapper(bounded, func)


# ---- the environment -------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Route loop iteration and `~` through the environment so that they are bounded too."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        bounded = nodes.For(node.target, nodes.Call(nodes.EnvironmentAttribute("budget_iter"), [node.iter], [],
                                                    None, None, lineno=node.lineno),
                            node.body, node.else_, node.test, node.recursive, lineno=node.lineno)
        super().visit_For(bounded, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.str_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, **options: Any):
        super().__init__(finalize=_count_printed, **options)
        self.globals.pop("lipsum", None)  # generates text of any size; no recipe needs it
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def budget_iter(iterable: Any) -> Any:
        return _BudgetIterable(iterable)

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Block bodies, macros and {% set %} blocks are joined here: bound the total as it grows."""
        buffer, total = [], 0
        for part in parts:
            total += len(part)
            if total > MAX_TEMPLATE_OUTPUT:
                raise TemplateLimitError(f"the template would render more than the limit of {MAX_TEMPLATE_OUTPUT} characters")
            buffer.append(part)
        return "".join(buffer)

    def str_concat(self, parts: tuple) -> str:
        _tick()
        for part in parts:
            _check_size(part, "an operand of ~ is")
        return self.concat(map(str, parts))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right), f"the result of {operator} is")

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: B902, N805
        _tick()
        for arg in (__obj, *args, *kwargs.values()):
            _check_size(arg, "an argument is")
        args = _check_method_call(__obj, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs), "the result of a call is")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_brace_format(text)
            return wrapped(*args, **kwargs)

        return update_wrapper(checked, value)


class _BudgetIterable:
    """An iterable whose every step checks the time budget; keeps `len` for `loop.length`."""

    def __init__(self, iterable: Any):
        self._iterable = iterable

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable:
            _tick()
            yield item


_ENV = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


# ---- rendering -------------------------------------------------------------------------------


@contextmanager
def time_budget() -> Iterator[None]:
    """One budget of MAX_TEMPLATE_SECONDS for every render inside (all of a file's templates)."""
    token = _deadline.set(time.monotonic() + MAX_TEMPLATE_SECONDS)
    try:
        yield
    finally:
        _deadline.reset(token)


def render(text: str, variables: dict[str, Any]) -> str:
    """`text` rendered in the sandbox, within the current time budget and the size limits."""
    _tick()
    token = _printed.set([0])
    try:
        return _ENV.concat(_ENV.from_string(text).generate(**variables))  # stops at the size limit
    finally:
        _printed.reset(token)
