"""Compatibility re-export: the block schedule (plan/schedule.py), for pickles saved before the move."""

from ..plan.schedule import SiteSchedule, block_schedule

__all__ = ["SiteSchedule", "block_schedule"]
