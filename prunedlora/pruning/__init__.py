"""Pruning building blocks shared by the methods: the criteria registries (``criteria.py``, torch-free) and their
functions (``rank_criteria``, ``structured_criteria``, ``base_criteria``), sparsity schedules (``schedules``),
structure masks and calibration passes. Importing the package imports nothing: each module is imported by name."""
