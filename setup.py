"""Build of the optional oneDNN extension ``rsjax.kernels._onednn`` (csrc/onednn_conv.cc).

Headers: oneDNN's from the ``onednn-devel`` wheel and XLA's FFI headers from ``jaxlib`` (both in
the [build-system] requirements). The library is not linked; rsjax.kernels.onednn loads the
``onednn`` wheel's libdnnl at run time. Any failure here leaves the extension out and the install
goes on: rsjax then says once that it uses XLA's convolutions (docs/onednn.md).
"""

import importlib.metadata as md
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _dnnl_include():
    for dist in ("onednn-devel", "onednn_devel"):
        try:
            files = md.files(dist) or []
        except md.PackageNotFoundError:
            continue
        for f in files:
            if str(f).replace("\\", "/").endswith("oneapi/dnnl/dnnl.hpp"):
                return os.path.dirname(os.path.dirname(os.path.dirname(str(f.locate()))))
    for d in (os.path.join(sys.prefix, "include"),):
        if os.path.exists(os.path.join(d, "oneapi", "dnnl", "dnnl.hpp")):
            return d
    raise RuntimeError("no oneDNN headers (pip install onednn-devel)")


def _ffi_include():
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no jaxlib, whose XLA FFI headers the extension needs")
    d = os.path.join(list(spec.submodule_search_locations)[0], "include")
    if not os.path.exists(os.path.join(d, "xla", "ffi", "api", "ffi.h")):
        raise RuntimeError(f"jaxlib has no XLA FFI headers in {d}")
    return d


class OptionalBuildExt(build_ext):
    """build_ext that finds the headers, and on any failure builds nothing instead of failing."""

    def run(self):
        try:
            for ext in self.extensions:
                ext.include_dirs += [_dnnl_include(), _ffi_include()]
            super().run()
        except Exception as e:  # noqa: BLE001 - the extension is optional
            print(f"rsjax: the oneDNN extension was not built ({type(e).__name__}: {e}); "
                  f"rsjax will use XLA's convolutions", file=sys.stderr)


ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension("rsjax.kernels._onednn", ["csrc/onednn_conv.cc", "csrc/onednn_train.cc"], language="c++",
                                 depends=["csrc/onednn_common.h"],
                                 extra_compile_args=["-O2", "-std=c++17", "-w"], optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
