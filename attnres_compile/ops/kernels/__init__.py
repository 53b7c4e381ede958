"""The kernels of the depth-attention ops, each checked against ops/reference.py.

`dispatch.py` which kernel serves a call; Triton: `triton_spec.py` (what a kernel is
specialised on), `triton_codegen.py` (its source), `triton_cache.py` (on disk, imported),
`triton_launch.py` (the launchers), `triton_interpret.py` (the CPU interpreter's shims and byte
counts), `selfcheck.py` (each kernel checks itself on first use); `cpu.py` the native CPU
kernels built at install.
"""
