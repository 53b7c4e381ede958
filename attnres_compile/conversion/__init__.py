"""Conversion: from a model to its plan. It imports the plan and the ops, never the runtime.

`capture.py` torch.export (non-strict) with the adds recorded where they ran; `links.py` and
`find_chains.py` the residual links and the streams they form, `prenorm.py` whether a stream is
PreNorm, `graph_utils.py` their graph vocabulary; `blocks.py` the block size; `select.py` which
chains a conversion takes; `build.py` the plan of each chain; `report.py` the report;
`derive.py` all of it, once per mode; `inputs.py` the example inputs and versions a plan
records; `rederive.py` a saved plan re-derived where the model's code moved; `graph_rewrite.py`
a graph module converted node by node (the compile backend's unconverted graphs).
"""
