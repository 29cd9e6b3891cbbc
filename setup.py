"""Installs `moetion` and `logging_store`; builds the optional native filters from `csrc/`.

The native extension is optional on purpose: `logging_store` has a byte-identical pure numpy
fallback, so a machine without a C compiler still installs and runs (only slower).
"""
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class _OptionalBuildExt(build_ext):
    """Builds C extensions, but turns a compiler failure into a warning instead of an error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any toolchain failure means "use the fallback"
            print(f"WARNING: native extension not built ({error}); using the numpy fallback")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            print(f"WARNING: {ext.name} not built ({error}); using the numpy fallback")


setup(
    name="moetion",
    version="0.1.0",
    description="Fault-tolerant pipeline-parallel Mixture-of-Experts training for PyTorch",
    packages=find_packages(include=["moetion", "moetion.*", "logging_store", "logging_store.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Exactly the CPU wheel these machines carry; never let pip pick a bare `torch`.
        "torch==2.13.0",
        "numpy>=1.26,<3",
        "lz4>=4.3,<5",
        "zstandard>=0.22,<1",
    ],
    extras_require={
        # matplotlib is in the test extra so that CI checks the report's PNGs, not just its text.
        # torchdata: the tests resume a real StatefulDataLoader (its own torch>=2 pin admits 2.13.0).
        "test": ["pytest>=8,<10", "pytest-timeout>=2.2,<3", "hypothesis>=6.100,<7", "matplotlib>=3.7,<4",
                 "torchdata>=0.11,<0.12"],
        "plots": ["matplotlib>=3.7,<4"],  # moetion report, moetion plan --plot
        "progress": ["tqdm>=4.60,<5"],  # progress bars with rate and ETA (a plain counter without)
        "tensorboard": ["tensorboard>=2.10,<3"],  # metrics.tensorboard
        # Peers in experiments/bench_overhead.py; never needed by moetion itself.
        "bench": ["lm-resiliency==0.2.0", "matplotlib>=3.7,<4"],
    },
    ext_modules=[
        Extension(
            "logging_store._native",
            sources=["csrc/logging_store_native.c"],
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": _OptionalBuildExt},
    entry_points={"console_scripts": ["moetion=moetion.cli:main"]},
)
