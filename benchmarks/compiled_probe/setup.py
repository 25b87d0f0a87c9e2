"""Builds the throwaway `_probe` extension in place (issue #16's measurement, not a product):

    cd benchmarks/compiled_probe && ../../.venv/bin/python setup.py build_ext --inplace
"""

from setuptools import Extension, setup  # type: ignore[import-untyped]

setup(
    name="asyncpool-compiled-probe",
    ext_modules=[Extension("_probe", ["_probe.c"], extra_compile_args=["-O2", "-Wall"])],
)
