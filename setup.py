"""Setuptools shim; the metadata lives in setup.cfg.

``REMOTEDIALER_MYPYC=1`` at build time compiles the hot modules listed in
setup.cfg's ``[remotedialer:mypyc]`` section with mypyc (their Python source
ships beside them and is what runs wherever they are not compiled). pip's
isolated build then installs mypy first (it asks this file what the build
needs). Without a working C compiler the build warns and the wheel holds the
pure-Python package. Without the variable nothing is compiled.
"""
import configparser
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: What the compiled build needs at build time besides the package's own
#: requirements: mypy (as in the test extra), and what the compiled modules
#: import that mypy must see to type-check them (numpy: frames.py).
BUILD_EXTRAS = ["mypy>=1.10", "numpy>=1.21", "types-requests"]


def _setup_cfg():
    config = configparser.ConfigParser()
    config.read(os.path.join(os.path.dirname(os.path.abspath(__file__)), "setup.cfg"))
    return config


def compiled_modules():
    """The source files setup.cfg lists for mypyc."""
    return _setup_cfg()["remotedialer:mypyc"]["modules"].split()


def compiled_build_requires():
    """What pip's isolated build installs for the compiled build: mypy type-checks
    the listed modules, so it needs the packages they import (the runtime ones)."""
    runtime = _setup_cfg()["options"]["install_requires"].split("\n")
    return [line.strip() for line in runtime if line.strip()] + BUILD_EXTRAS


class BuildExtOrPurePython(build_ext):
    """build_ext that leaves the package pure Python when compiling fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: CCompilerError, DistutilsError...
            self._pure(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._pure(exc)

    def _pure(self, exc):
        print(f"WARNING: REMOTEDIALER_MYPYC=1 but the modules could not be compiled ({exc}); "
              "building pure Python", file=sys.stderr)
        self.extensions = []


#: setup.py commands that only write metadata: no need to run mypyc for them.
METADATA_ONLY = {"egg_info", "dist_info", "--version", "--name"}

if os.environ.get("REMOTEDIALER_MYPYC") == "1":
    try:
        from mypyc.build import mypycify
    except ImportError:  # pip's first pass, asking for the build's requirements
        mypycify = None
    # pip asks for the build's requirements with egg_info: mypy must be named there too
    if mypycify is None or METADATA_ONLY.intersection(sys.argv[1:]):
        setup(setup_requires=compiled_build_requires())
    else:
        setup(setup_requires=compiled_build_requires(), cmdclass={"build_ext": BuildExtOrPurePython},
              ext_modules=mypycify(compiled_modules(), opt_level="3"))
else:
    setup()
