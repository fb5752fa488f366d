"""Command-line and config mistakes as one line: the field, what is wrong with it, the closest accepted names.

jsonargparse reports a mistake in a subclass-mode argument (``--model.init_args.lrr``) as the whole usage (60
lines), then a union-type error tree with the real reason ("Option 'lrr' is not accepted") in its middle.
``StrataArgumentParser`` prints only the reason, on one line, with "did you mean" from the class's own arguments,
and exits with code 2, argparse's code for a usage error. ``JSONARGPARSE_DEBUG=1`` keeps jsonargparse's own report.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["StrataArgumentParser", "one_line_parse_error"]

_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)')
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<cls>[^']+)':")
_NOT_ACCEPTED = re.compile(r"Option '(?P<name>[^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a <class '(?P<type>[^']+)'>\. Got value: (?P<value>.*)")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<option>--[^\s=]+)")
_NOT_ACCEPT_OPTION = re.compile(r"Subcommand '(?P<sub>[^']+)' does not accept option '(?P<option>[^']+)'")
_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def _closest(name: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


def _class_arguments(class_path: str) -> list[str]:
    """The ``__init__`` argument names of ``class_path`` and, through ``**kwargs``, of its bases (as jsonargparse)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else []:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def one_line_parse_error(message: str, options: Iterable[str] = ()) -> str:
    """The reason in jsonargparse's error ``message``, on one line; ``options`` are the parser's accepted keys."""
    option = _UNRECOGNIZED.search(message) or _NOT_ACCEPT_OPTION.search(message)
    if option:
        name = option["option"].lstrip("-")
        return f"--{name} is not an option{_closest(name, options)}"
    stack: list[tuple[int, str, str | None]] = []  # (indent, key, class_path) from the outermost key inwards
    for raw in message.splitlines():
        indent = len(raw) - len(raw.lstrip(" -"))
        line = raw.strip().removeprefix("- ").strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if key := _PARSER_KEY.match(line):
            stack.append((indent, key["key"], None))
            line = key["rest"]
        elif cls := _CLASS_PATH.match(line):
            stack.append((indent, "init_args", cls["cls"]))
            continue
        if not line or line.startswith(_NOISE):
            continue
        path = ".".join(key for _, key, _ in stack)
        class_path = next((cls for _, _, cls in reversed(stack) if cls), None)
        if bad := _NOT_ACCEPTED.match(line):
            field = f"--{path}.{bad['name']}" if path else f"--{bad['name']}"
            owner = f"{class_path} has" if class_path else "there is"
            hint = _closest(bad["name"], _class_arguments(class_path or ""))
            return f"{field}: {owner} no argument {bad['name']!r}{hint}"
        if expected := _EXPECTED.match(line):
            return f"--{path}: expected {expected['type']}, got {expected['value'].strip()!r}"
        return f"--{path}: {line}" if path else line
    return " ".join(message.split())


def _accepted_keys(parser: ArgumentParser) -> list[str]:
    keys = [action.dest for action in parser._actions if action.dest not in (None, "help")]
    return [key for key in keys if isinstance(key, str)]


class StrataArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose usage errors are one line on stderr (see the module docstring), exit 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("1", "true", "yes"):
            super().error(message, ex)
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {one_line_parse_error(message, _accepted_keys(parser))}\n")
        sys.exit(2)
