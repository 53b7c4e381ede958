"""Native code of attnres-compile, built once by `pip install` (metadata is in pyproject.toml).

* ``attnres_compile._C``: the CPU kernels of depth attention as PyTorch ops
  (``csrc/attnres_cpu.cpp``), a torch C++ extension. It needs torch at build time, so install
  torch first and build without isolation: ``pip install --no-build-isolation .`` (the
  Makefile does). In an isolated build torch is absent, this extension is skipped with a
  message, and the package runs the PyTorch path with one warning.
* ``attnres_compile._ort_kernel``: the fused onnxruntime kernel of ``attnres::DepthAttention``
  (``csrc/ort_kernel.c``), a plain C shared library built against the vendored onnxruntime
  C API headers in ``third_party/onnxruntime`` (used by the build only, never installed).

Both are optional: a failed compile (no compiler, unsupported platform) leaves the pure-Python
package working, and no compiler is ever needed at run time. Neither uses ``-march=native``:
``_C`` compiles its kernels for baseline x86-64, AVX2 and AVX-512 and picks one at load time.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

OPT = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]

ORT_KERNEL = Extension(
    "attnres_compile._ort_kernel",
    sources=["csrc/ort_kernel.c"],
    include_dirs=["third_party/onnxruntime/include"],
    extra_compile_args=["-std=c11", *OPT],
    libraries=["m"],
    optional=True,
)


def _extensions_and_builder():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("attnres-compile: torch is not importable in this build environment, so the native CPU "
              "kernels (attnres_compile._C) are not built; install torch first and use "
              "`pip install --no-build-isolation .`", file=sys.stderr)
        return [ORT_KERNEL], _build_ext
    native = CppExtension(
        "attnres_compile._C",
        sources=["csrc/attnres_cpu.cpp", "csrc/kernels_base.cpp", "csrc/kernels_avx2.cpp", "csrc/kernels_avx512.cpp"],
        extra_compile_args=["-std=c++20", *OPT],
        optional=True,
    )

    class build_ext(BuildExtension):
        """torch's builder (ninja: the four translation units compile in parallel) for _C; the
        plain setuptools compile for the C library, which ninja's rules would compile as C++."""

        def build_extensions(self):
            self._plain_compile = self.compiler.compile
            super().build_extensions()

        def build_extension(self, ext):
            if ext is not ORT_KERNEL:
                return super().build_extension(ext)
            wrapped, self.compiler.compile = self.compiler.compile, self._plain_compile
            try:
                return _build_ext.build_extension(self, ext)
            finally:
                self.compiler.compile = wrapped

    return [native, ORT_KERNEL], build_ext


ext_modules, build_ext = _extensions_and_builder()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
