"""Which build of the package is loaded: the modules setup.cfg lists for
mypyc (``[remotedialer:mypyc]``) are compiled exactly when
``REMOTEDIALER_MYPYC=1`` is set for the test run, as for the build (.ci/run
runs the suite both ways); otherwise they are the Python source."""

import configparser
import importlib
import importlib.machinery
import os
import pathlib
from typing import List

ROOT = pathlib.Path(__file__).resolve().parent.parent


def listed_paths() -> List[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["remotedialer:mypyc"]["modules"].split()


def is_compiled(module_name: str) -> bool:
    path = str(importlib.import_module(module_name).__file__)
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_listed_modules_exist() -> None:
    paths = listed_paths()
    assert paths and all((ROOT / path).is_file() for path in paths), paths


def test_the_build_the_run_asks_for_is_loaded() -> None:
    wanted = os.environ.get("REMOTEDIALER_MYPYC") == "1"
    names = [path[:-len(".py")].replace("/", ".") for path in listed_paths()]
    loaded = {name: is_compiled(name) for name in names}
    assert loaded == {name: wanted for name in names}, (
        "REMOTEDIALER_MYPYC=1 (compiled) was asked for" if wanted else "pure Python was asked for")
    # the rest of the package is Python either way
    assert not is_compiled("remotedialer.client")
