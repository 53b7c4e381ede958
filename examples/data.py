"""A byte-level text corpus every machine has offline: Python's own standard library.

The `.py` files under `sysconfig.get_paths()["stdlib"]` (no site-packages, no test suites, no generated codec tables),
sorted by relative path, are read as bytes until `max_bytes` is reached. Each file goes to
the validation split when a hash of its relative path says so (about 1 in 10 files), else to
training, and each split is the concatenation of its files as one uint8 tensor. Nothing is
written to disk; the corpus is read once per process (a few MB, well under a second).

The corpus depends on the Python version the interpreter ships, which is fine for a demo:
baseline and converted models are always compared on the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
VAL_EVERY = 10                     # a file is validation when hash(path) % VAL_EVERY == 0
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings"}  # encodings: mostly generated codec tables
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Corpus:
    root: str
    train: torch.Tensor            # uint8 [N_train]
    val: torch.Tensor              # uint8 [N_val]
    train_files: int
    val_files: int

    def split(self, name: str) -> torch.Tensor:
        if name in ("val", "validation"):
            return self.val
        if name == "train":
            return self.train
        raise ValueError(f"split must be 'train' or 'val', got {name!r}")

    def describe(self) -> str:
        return (f"Python stdlib at {self.root}: train {self.train.numel() / 1e6:.2f} MB "
                f"({self.train_files} files), val {self.val.numel() / 1e6:.2f} MB ({self.val_files} files)")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Relative paths of the stdlib's .py files, sorted, without site-packages, tests or codec tables."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                out.append(Path(dirpath, f).relative_to(root))
    return sorted(out, key=lambda p: p.as_posix())


def is_validation(rel_path: Path | str) -> bool:
    digest = hashlib.sha256(Path(rel_path).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little") % VAL_EVERY == 0


@functools.lru_cache(maxsize=4)
def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> Corpus:
    """Read up to `max_bytes` of the stdlib's source (whole files, in path order)."""
    base = stdlib_root() if root is None else Path(root)
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    total = 0
    for rel in stdlib_files(base):
        try:
            data = (base / rel).read_bytes()
        except OSError:
            continue
        if not data:
            continue
        if total + len(data) > max_bytes and total > 0:
            break
        parts["val" if is_validation(rel) else "train"].append(data)
        total += len(data)
    if not parts["train"] or not parts["val"]:
        raise RuntimeError(f"no Python source found under {base} for the demo corpus")

    def cat(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return Corpus(str(base), cat(parts["train"]), cat(parts["val"]), len(parts["train"]), len(parts["val"]))


def get_batch(split: str, batch_size: int, block_size: int, generator: torch.Generator,
              corpus: Corpus | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `block_size` bytes and their next-byte targets, both int64 [B, T].

    The offsets come from `generator` alone, so the same generator state gives the same batch.
    """
    data = (corpus or load_corpus()).split(split)
    if data.numel() <= block_size + 1:
        raise ValueError(f"{split} split has {data.numel()} bytes, fewer than block_size + 2")
    ix = torch.randint(data.numel() - block_size - 1, (batch_size,), generator=generator)
    offsets = ix[:, None] + torch.arange(block_size + 1)[None, :]
    window = data[offsets].long()
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def decode(tokens: torch.Tensor) -> str:
    """Bytes back to text (for printing samples)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
