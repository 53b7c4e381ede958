"""Parallelism front ends: pipeline stages with cross-stage block caching (pipeline.py).

Sites over DTensor sources (tensor and sequence parallelism) are the op itself
(ops/sharded.py), which the runtime calls below this folder."""
