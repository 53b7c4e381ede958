"""Serving engines for converted models: the vLLM plugin (vllm_plugin.py, docs/serving.md)."""
