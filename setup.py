"""Build the Cython fast path. Everything else is declared in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "wsproxy._fastpath",
        ["wsproxy/_fastpath.pyx"],
        depends=["wsproxy/_jsonvalid.h", "wsproxy/_fastpath.pxd"],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
