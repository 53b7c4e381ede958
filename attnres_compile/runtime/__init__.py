"""The runtime: a conversion plan installed on the user's model, served at every call.

It imports the plan and the ops, never conversion (a stale plan's re-derivation is handed to
it as a function). One module per stage:

* `core.py`       install: which module gets which instance attribute, pickling;
* `planned.py`    the instance attributes: a module's planned method, what its adds call;
* `recompile.py`  the planned functions recompiled from their source with each residual add
                  calling the runtime (no per-op cost anywhere else);
* `links.py`      per call: which link an add is, the block state it advances;
* `sites.py`      one site: single-pass, two-phase, DTensor sources;
* `state.py`      per-call state (runs, calls, tags), owned by the call and its thread;
* `mode.py`       the fallback for adds whose code cannot be recompiled: a torch function mode;
* `replay.py`     a saved plan located on the model's own code (never importing what it names);
* `params.py`     the AttnRes parameters (`converted.attnres`) and their saved forms.
"""

from .core import AttnResRuntime, install
from .planned import is_planned
from .sites import site_output

__all__ = ["AttnResRuntime", "install", "is_planned", "site_output"]
