"""The plan: the hinge between conversion and everything after it.

`types.py` the data classes (whose annotations are the saved format's schema), `fields.py`
the value types of their fields, `schedule.py` the block schedule, `format.py` the saved
format (versions, validation, digest, migrations, the layout saved with the weights),
`limits.py` the ranges its numbers fall in.
"""

from .format import FORMAT, to_document
from .schedule import SiteSchedule, block_schedule
from .types import AddSite, ChainPlan, ConversionPlan, LinkPlan, SitePlan, read_plan

__all__ = ["FORMAT", "AddSite", "ChainPlan", "ConversionPlan", "LinkPlan", "SitePlan", "SiteSchedule",
           "block_schedule", "read_plan", "to_document"]
