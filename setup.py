"""Only the C extension is declared here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("bpfs._gearcdc", ["bpfs/_gearcdc.c"], extra_compile_args=["-O3", "-std=c11"], optional=False),
    Extension("bpfs._packhash", ["bpfs/_packhash.c"], extra_compile_args=["-O3", "-std=c11"], optional=False),
])
