"""Atomic file writes: write a temporary file beside the target, then ``os.replace`` it.

A reader (or a resumed run) never sees a half-written file: the target either keeps its old
content or gets the complete new one. A temporary file is named ``.<target name>.drdm-tmp-<random>
<suffix>`` (:func:`temporary_pattern`), so a resumable writer can find the leftovers of an
interrupted run of its own targets and nothing else: a user's dot-files never match.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

TEMPORARY_MARK = ".drdm-tmp-"


def temporary_pattern(target_name: str) -> re.Pattern:
    """The names :func:`atomic_write` gives temporary files of the target ``target_name``."""
    suffix = re.escape(_suffix(Path(target_name)))
    mark = re.escape(TEMPORARY_MARK)
    return re.compile(rf"\.{re.escape(target_name)}{mark}[A-Za-z0-9_]+{suffix}")


def remove_temporaries(folder: str | Path, target_names) -> list[Path]:
    """Delete the leftover temporary files of ``target_names`` in ``folder`` (an interrupted
    :func:`atomic_write` of one of them); any other file is left alone. Returns what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [temporary_pattern(name) for name in target_names]
    removed = []
    for candidate in folder.glob(f".*{TEMPORARY_MARK}*"):
        if candidate.is_file() and any(p.fullmatch(candidate.name) for p in patterns):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move the result to ``path`` atomically.

    The temporary file lives in ``path``'s folder (same file system, so the rename is atomic),
    keeps ``path``'s suffixes (writers such as nibabel and matplotlib choose the format from
    them) and gets the permissions of an ordinary new file (``mkstemp`` makes owner-only files).
    Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}{TEMPORARY_MARK}", suffix=_suffix(path), dir=path.parent
    )
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, document: object) -> Path:
    """Write ``document`` as indented JSON atomically."""
    return write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def write_csv_atomic(
    path: str | Path, rows: Iterable[Mapping], columns: Sequence[str], extrasaction: str = "ignore"
) -> Path:
    """Write ``rows`` (mappings) under a header of ``columns`` atomically."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction=extrasaction)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def save_figure_atomic(figure, path: str | Path, dpi: int = 100) -> Path:
    """``figure.savefig`` to ``path`` atomically (the format follows the suffix)."""
    return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=dpi))
