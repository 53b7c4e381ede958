"""Compatibility: the modules that lived here moved (ops/kernels/, compile/, onnx/); the
paths users and entry points named keep working through the re-exports in this folder."""
