"""Compatibility re-export: the conversion report lives in convert/report.py (pickled models
saved before the move name this path)."""

from .convert.report import ChainReport, ConversionReport, LeftAloneReport, SiteReport

__all__ = ["ChainReport", "ConversionReport", "LeftAloneReport", "SiteReport"]
