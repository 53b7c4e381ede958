"""Compatibility re-export: the conversion report lives in conversion/report.py (pickled models
saved before the move name this path)."""

from .conversion.report import ChainReport, ConversionReport, LeftAloneReport, SiteReport

__all__ = ["ChainReport", "ConversionReport", "LeftAloneReport", "SiteReport"]
