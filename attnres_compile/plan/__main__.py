"""python -m attnres_compile.plan [--schema]: the saved format's field table (docs/plan-format.md),
or its JSON Schema (docs/plan-format.schema.json)."""

import json
import sys

from .format import json_schema, markdown_fields
from .types import ConversionPlan

if "--schema" in sys.argv:
    print(json.dumps(json_schema(ConversionPlan), indent=1, sort_keys=True))
else:
    print(markdown_fields(ConversionPlan))
