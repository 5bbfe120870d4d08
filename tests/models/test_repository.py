"""The repository stands alone: no tracked file reads anything beside it."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Written in two pieces so that this file does not match itself.
OUTSIDE = "../" + "shared"


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_to_a_folder_beside_the_repository():
    files = tracked_files()
    assert len(files) > 50, "git ls-files listed too few files to mean anything"
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if OUTSIDE in line]
    assert not offenders, f"these lines refer to {OUTSIDE}, which a clone does not have: {offenders}"


def test_the_benchmark_text_is_in_the_repository():
    from wasmlm_models.files import DEFAULT_TEXT
    assert DEFAULT_TEXT.is_file() and DEFAULT_TEXT.is_relative_to(ROOT)
    assert DEFAULT_TEXT.stat().st_size == 1_115_394
