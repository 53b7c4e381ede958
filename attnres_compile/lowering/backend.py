"""Compatibility re-export: the torch.compile backend lives in compile/backend.py."""

from ..compile.backend import attnres_backend

__all__ = ["attnres_backend"]
