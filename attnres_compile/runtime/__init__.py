"""The runtime: a conversion plan installed on the user's model, served at every call.

The stages of a call, one module each:

* `core.py`     install (which module gets which instance attribute) and the link logic: a
                planned add returns its depth-attention site, the run keeps the blocks;
* `codegen.py`  the planned functions recompiled from their source with each residual add
                calling the runtime (no per-op cost anywhere else);
* `state.py`    per-call state (runs, calls, tags), owned by the call and its thread;
* `mode.py`     the fallback for adds whose code cannot be recompiled: a torch function mode;
* `replay.py`   plans saved under one version of the model's code, checked and re-derived
                under another.
"""

from .core import AttnResRuntime, install, site_output

__all__ = ["AttnResRuntime", "install", "site_output"]
