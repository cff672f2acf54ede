"""The one thing pyproject.toml cannot say: the packages are every package under ``prunedlora/`` (a new method
folder ships without an edit here) plus the top-level ``configs/``, mapped in as ``prunedlora.configs``
(``[tool.setuptools] package-dir``). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["prunedlora", "prunedlora.*"]), "prunedlora.configs"])
