"""Build: Cython extensions for meshproxy/_fast, unless MESHPROXY_NO_EXTENSIONS is set.

With MESHPROXY_NO_EXTENSIONS=1 nothing is compiled and meshproxy.codec picks
the pure-Python twins at import time.
"""

import os
from pathlib import Path

from setuptools import Extension, setup


def extensions() -> list[Extension]:
    if os.environ.get("MESHPROXY_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    sources = sorted(Path("meshproxy/_fast").glob("*.pyx"))
    exts = [
        Extension(
            f"meshproxy._fast.{src.stem}",
            [str(src)],
            extra_compile_args=["-O2"],
        )
        for src in sources
    ]
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
        annotate=bool(os.environ.get("MESHPROXY_ANNOTATE")),
    )


setup(ext_modules=extensions())
