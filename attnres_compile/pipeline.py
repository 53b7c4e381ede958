"""Compatibility re-export: pipeline stages live in parallel/pipeline.py."""

from .parallel.pipeline import AttnResStage, PipelineSplitError, pipeline_stages, run_locally

__all__ = ["AttnResStage", "PipelineSplitError", "pipeline_stages", "run_locally"]
