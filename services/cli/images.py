"""Photos named on the command line: ``--images`` takes folders, files and glob patterns, in any mix."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "expand_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def expand_images(specs: Sequence[str]) -> list[Path]:
    """The image files of each argument: a folder (its PNG/JPEG/WebP files, sorted), a file, or a glob pattern
    (quoted, so that the shell leaves it: 'photos/*.jpg'). FileNotFoundError / ValueError say which argument."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no PNG/JPEG/WebP images in the folder {spec}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif any(char in spec for char in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"no file matches {spec}")
            files.extend(found)
        else:
            raise FileNotFoundError(f"no such file or folder: {spec}")
    return files
