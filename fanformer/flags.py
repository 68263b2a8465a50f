"""Command-line flags as users type them: `--max-model-len` and `--max_model_len` alike.

vLLM and most CLIs spell flags with dashes, HF transformers' scripts with underscores; our
flags are declared once, with underscores (that spelling is what `--help` shows), and
`normalize_argv` rewrites a dashed flag name to it before argparse sees it. `FlagParser`
does that for every parse and prints each option's default in `--help`. All four commands
(fanformer-train, -quantize, -serve, -generate) parse through here. Values are never
rewritten: only the `--name` part of `--name` or `--name=value`, and nothing after `--`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

_FLAG = re.compile(r"^--([A-Za-z][A-Za-z0-9_-]*)(=.*)?$", re.DOTALL)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--max-model-len=8` -> `--max_model_len=8`; positionals and values are left alone."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        match = _FLAG.match(arg)
        if match:
            arg = "--" + match.group(1).replace("-", "_") + (match.group(2) or "")
        out.append(arg)
    return out


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except for flags whose default says nothing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False \
                or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """argparse with dash/underscore-insensitive flag names, defaults in --help, and a bad
    command line reported in one line (argparse prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(normalize_argv(args), namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
