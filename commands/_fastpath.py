"""Parse an ordinary command line without building the typer app.

typer 0.26 and later coerce every parameter through a pydantic TypeAdapter: importing
pydantic and building the adapters costs about 0.15 s per command start, more than the
whole analysis of a small bundle.  Most command lines are plain: known options, values
that are plainly numbers, the right number of arguments.  Those are parsed here, from the
same ``typer.Option`` / ``typer.Argument`` declarations the commands give typer, and the
command runs without typer parsing anything.  Anything else (``--help``, a typo, a value
typer would refuse or convert in its own way, a number out of range, shell completion)
returns None and goes to typer, which gives its usual message; so a line parsed here
means what typer would make of it (tests/test_startup.py checks the two agree).
"""

from __future__ import annotations

import inspect
import re
import typing

_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


class _Fallback(Exception):
    """This line is typer's to parse."""


class _OutOfRange(Exception):
    """A number outside its option's range: refused here in click's own words ("-3 is not in
    the range x>=40"), the same under every typer (0.29 words it "Input should be greater
    than or equal to 40", without the value given)."""

    def __init__(self, param, value):
        lo, hi = getattr(param.info, "min", None), getattr(param.info, "max", None)
        span = f"{lo}<=x<={hi}" if lo is not None and hi is not None else f"x>={lo}" if lo is not None else f"x<={hi}"
        name = (param.names or [param.name.upper()])[0] if param.is_option else param.name.upper()
        super().__init__(f"Invalid value for '{name}': {value} is not in the range {span}.")


class _Param:
    __slots__ = ("name", "kind", "info", "many", "is_option", "names", "off_names")

    def __init__(self, name, annotation, info):
        self.name = name
        self.info = info
        origin = typing.get_origin(annotation)
        self.many = origin is list
        kind = typing.get_args(annotation)[0] if self.many else annotation
        if kind not in (str, int, float, bool) or (self.many and kind is bool):
            raise _Fallback
        self.kind = kind
        self.is_option = type(info).__name__ == "OptionInfo"
        if any(
            getattr(info, attr, None)
            for attr in ("callback", "envvar", "prompt", "parser", "click_type", "default_factory")
        ):
            raise _Fallback  # behaviour typer adds to the value
        self.names: list[str] = []
        self.off_names: list[str] = []
        if self.is_option:
            for decl in getattr(info, "param_decls", None) or ():
                on, _, off = decl.partition("/")
                if off and kind is not bool:
                    raise _Fallback
                self.names += [n.strip() for n in on.split() if n.strip()]
                self.off_names += [n.strip() for n in off.split() if n.strip()]
            if not self.names or any(not n.startswith("-") for n in self.names + self.off_names):
                raise _Fallback  # a name typer derives itself: not worth guessing here
        elif type(info).__name__ != "ArgumentInfo":
            raise _Fallback

    @property
    def required(self) -> bool:
        return self.info.default is ...

    def convert(self, text: str):
        if self.kind is str:
            return text
        if self.kind is int and _INT.match(text):
            value: int | float = int(text)
        elif self.kind is float and _FLOAT.match(text):
            value = float(text)
        else:
            raise _Fallback
        lo, hi = getattr(self.info, "min", None), getattr(self.info, "max", None)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _OutOfRange(self, value)
        return value


_SPECS: dict = {}


def _spec(run) -> list[_Param]:
    spec = _SPECS.get(run)
    if spec is None:
        sig = inspect.signature(run, eval_str=True)
        spec = []
        for p in sig.parameters.values():
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise _Fallback
            spec.append(_Param(p.name, p.annotation, p.default))
        _SPECS[run] = spec
    return spec


def parse(run, args: list[str], command: str = "") -> dict | None:
    """The keyword arguments typer would call ``run`` with for ``args``, or None when this
    line is one for typer to parse (or refuse).  A line that parses but for a number out of
    its range raises kvprof.errors.UsageError."""
    try:
        spec = _spec(run)
    except _Fallback:
        return None
    problems: list[str] = []
    try:
        out = _parse(spec, args, problems)
    except _Fallback:
        return None
    if problems:
        from kvprof.errors import UsageError

        raise UsageError(f"{problems[0]} (see `kvprof {command} --help`)" if command else problems[0])
    return out


def _convert(p: _Param, text: str, problems: list[str]):
    try:
        return p.convert(text)
    except _OutOfRange as exc:
        problems.append(str(exc))
        return None


def _parse(spec: list[_Param], args: list[str], problems: list[str]) -> dict:
    options = {n: p for p in spec if p.is_option for n in p.names}
    negated = {n: p for p in spec if p.is_option for n in p.off_names}
    values: dict = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            positional += args[i:]
            break
        if not a.startswith("-") or a == "-":
            positional.append(a)
            continue
        name, eq, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in negated and not eq:
            values[negated[name].name] = False
            continue
        p = options.get(name)
        if p is None:
            raise _Fallback  # --help, a typo, bundled short flags, -oVALUE
        if p.kind is bool:
            if eq:
                raise _Fallback
            values[p.name] = True
            continue
        if eq:
            text = inline
        else:
            if i >= len(args):
                raise _Fallback  # "requires an argument"
            text = args[i]
            i += 1
            if text.startswith("-") and text != "-" and not _FLOAT.match(text):
                raise _Fallback  # typer takes it as the value; a line worth a second look
        value = _convert(p, text, problems)
        if p.many:
            values.setdefault(p.name, []).append(value)
        else:
            values[p.name] = value
    arguments = [p for p in spec if not p.is_option]
    for n, p in enumerate(arguments):
        if p.many:
            if n != len(arguments) - 1:
                raise _Fallback
            values[p.name] = [_convert(p, x, problems) for x in positional] or None
            positional = []
        elif positional:
            values[p.name] = _convert(p, positional.pop(0), problems)
        elif p.required:
            raise _Fallback  # "Missing argument"
    if positional:
        raise _Fallback  # "Got unexpected extra argument"
    out = {}
    for p in spec:
        if p.name in values:
            out[p.name] = values[p.name]
        elif p.required:
            raise _Fallback  # "Missing option"
        else:
            out[p.name] = p.info.default
    return out
