"""Compatibility re-export: the plan's classes (plan/types.py), at the path pickles of plans
saved before the move name."""

from ..plan.types import AddSite, ChainPlan, ConversionPlan, LinkPlan, SitePlan

__all__ = ["AddSite", "ChainPlan", "ConversionPlan", "LinkPlan", "SitePlan"]
