"""Output folders: a command writes only into a folder that is absent, empty, or its own.

Every folder a command creates gets a small marker file naming the command and the kind of
output (`.fanformer-output`: `{"written_by": "fanformer-quantize"}`), so a later run of the
same command can tell its own previous output (safe to replace or continue) from a folder a
user filled (never touched unless they pass `--overwrite`). `check_output_dir` is called
before any work; `marker_file` is written into the new folder before it appears (inside
`checkpoint.atomic_directory`, or first thing for a run folder). This module knows nothing
about models or checkpoints; fanformer.train and quant.cli call it.
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER = ".fanformer-output"


class OutputError(ValueError):
    """An output folder the command must not write into; one sentence for the user."""


def marker_text(written_by: str) -> str:
    return json.dumps({"written_by": written_by}) + "\n"


def write_marker(directory: str | Path, written_by: str) -> None:
    """Mark `directory` (created if missing) as `written_by`'s output."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text(marker_text(written_by))


def written_by(directory: str | Path) -> str | None:
    """Who marked `directory`, or None (no marker, or one that cannot be read)."""
    try:
        return json.loads((Path(directory) / MARKER).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_dir(path: str | Path, writer: str, flag: str, overwrite: bool = False,
                     whole: bool = False) -> None:
    """Raise OutputError unless `path` is absent, an empty folder, `writer`'s own output, or
    `overwrite` is set. `flag` names the option in the message (e.g. "--output").

    `whole`: the command replaces the folder as a whole (moves it aside and deletes it), so
    `overwrite` is honoured only for a checkpoint folder (one holding config.json), never
    for any other folder a user names (their home, a parent of the source)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose a folder path")
    if not path.exists() or not any(path.iterdir()) or written_by(path) == writer:
        return
    if whole and not (path / "config.json").is_file():
        raise OutputError(f"{flag} {path} is not empty and was not written by {writer}; choose "
                          "a new or empty folder (--overwrite replaces only a checkpoint "
                          "folder, one holding config.json)")
    if overwrite:
        return
    raise OutputError(f"{flag} {path} is not empty and was not written by {writer}; choose "
                      "a new or empty folder, or pass --overwrite to replace what is there")


def check_not_inside(inner: str | Path, outer: str | Path, inner_flag: str,
                     outer_flag: str) -> None:
    """Refuse `inner` equal to or inside `outer` (writing one would replace the other)."""
    a, b = Path(inner).resolve(), Path(outer).resolve()
    if a == b or b in a.parents:
        raise OutputError(f"{inner_flag} {inner} is inside {outer_flag} {outer}; choose a "
                          f"folder outside it")
    if a in b.parents:
        raise OutputError(f"{outer_flag} {outer} is inside {inner_flag} {inner}; choose "
                          "separate folders")
