"""What a run reads besides its config values: a fingerprint of every local file or folder its resolved config
names at an input key (data files, a raw DeepSpeed JSON, model and tokenizer folders), kept as
output_dir/inputs.json and in each checkpoint, so that `--resume` notices a data file edited or a model folder
retrained under the same path.

    file of <= 256 MiB   sha256 of its bytes
    larger file          sha256 of (size, mtime, the first and the last MiB): no minutes of hashing per start
    folder               sha256 of (relative name, size, mtime) of its files, hidden ones (.rlhf.lock, .tmp-*)
                         aside, the first 10,000 in name order (weights are not read: a folder copied without
                         its times counts as changed); a stage's output folder counts as its final/ and a
                         checkpoint-N folder as its hf/ (`model_folder`: what stages.model_paths.resolve_model_dir
                         loads), so `rlhf eval` writing beside a run, or ds/ states beside hf/, change nothing
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from stages.model_paths import model_folder

WHOLE_FILE = 256 * 2**20
EDGE = 2**20
FOLDER_ENTRIES = 10_000


def file_fingerprint(path: Path) -> str:
    """sha256 hex of a file's bytes, or for a large one of its size, mtime, first and last MiB."""
    digest = hashlib.sha256()
    info = path.stat()
    with open(path, "rb") as fh:
        if info.st_size <= WHOLE_FILE:
            for block in iter(lambda: fh.read(EDGE), b""):
                digest.update(block)
        else:
            digest.update(f"{info.st_size} {info.st_mtime_ns}".encode())
            digest.update(fh.read(EDGE))
            fh.seek(-EDGE, os.SEEK_END)
            digest.update(fh.read(EDGE))
    return digest.hexdigest()


def folder_fingerprint(path: Path) -> str:
    """sha256 hex of the (relative name, size, mtime) of a folder's files (see the module docstring); hidden
    files and folders are not entered, and the walk stops at FOLDER_ENTRIES files."""
    path = model_folder(path)
    files: list[Path] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
        if len(files) >= FOLDER_ENTRIES:
            break
    digest = hashlib.sha256()
    for file in sorted(files)[:FOLDER_ENTRIES]:
        info = file.stat()
        digest.update(f"{file.relative_to(path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def input_paths(tree: Any, reads: Callable[[str], bool]) -> dict[str, str]:
    """{dotted key: path} for every string value of a resolved config (`tree`, nested dicts and lists; list
    items keyed `key[i]`) that is an absolute path at a key the run reads from (`reads(key)`: the schema's input
    paths; not a folder the run writes, such as an inline DeepSpeed JSON's nvme_path)."""
    found: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{key}[{i}]")
        elif isinstance(value, str) and os.path.isabs(value) and reads(key):
            found[key] = value

    walk(tree, "")
    return found


def input_fingerprints(tree: Any, reads: Callable[[str], bool]) -> dict[str, dict[str, str]]:
    """{dotted key: {"path": p, "sha256": ...}} for each of `input_paths` that is an existing file or folder."""
    found: dict[str, dict[str, str]] = {}
    for key, value in input_paths(tree, reads).items():
        path = Path(value)
        try:
            if path.is_file():
                found[key] = {"path": value, "sha256": file_fingerprint(path)}
            elif path.is_dir():
                found[key] = {"path": value, "sha256": folder_fingerprint(path)}
        except OSError:
            continue  # unreadable now: the run itself will say so
    return found


def fingerprint_changes(before: dict[str, Any], after: dict[str, dict[str, str]]) -> list[str]:
    """"key (path): contents changed" for each input named by the same key and path in both whose fingerprint
    differs (a changed path is a config change, reported as one)."""
    changes = []
    for key in sorted(before.keys() & after.keys()):
        old, new = before[key], after[key]
        if isinstance(old, dict) and old.get("path") == new["path"] and old.get("sha256") != new["sha256"]:
            changes.append(f"{key} ({new['path']}): contents changed")
    return changes


def moved_inputs(before: dict[str, Any], after: dict[str, dict[str, str]]) -> set[str]:
    """Keys naming an input now at another path with the same fingerprint (a project moved or copied whole):
    the run reads what it read, so resuming it is exact.

    >>> moved_inputs({"data.train.path": {"path": "/a/x.jsonl", "sha256": "1"}},
    ...              {"data.train.path": {"path": "/b/x.jsonl", "sha256": "1"}})
    {'data.train.path'}
    """
    return {key for key in before.keys() & after.keys() if isinstance(before[key], dict)
            and before[key].get("path") != after[key]["path"] and before[key].get("sha256") == after[key]["sha256"]}
