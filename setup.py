"""Build of the optional C++ extension ``draftwise._C``.

The extension is optional: without a compiler (or pybind11) the build prints why and goes on,
and draftwise falls back to the torch implementation on the CPU.
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but never let a failed build fail the install."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure leaves the torch path
            self._skip(error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            self._skip(error)

    @staticmethod
    def _skip(error):
        print(f"draftwise: the C++ extension was not built ({error}); the torch backend serves the CPU.",
              file=sys.stderr)


def extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("draftwise: pybind11 is missing; the C++ extension is not built.", file=sys.stderr)
        return []
    return [
        Pybind11Extension(
            "draftwise._C",
            ["csrc/verify_chain.cpp", "csrc/verify_tree.cpp", "csrc/skinny_linear.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
