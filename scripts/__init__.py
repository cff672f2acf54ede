"""Benchmarks and comparisons behind ``docs/RESULTS.md``. Run each from the repository root as a module:

    python -m scripts.compare --suite methods
    python -m scripts.bench_salr --no-write --tiny

Scripts: ``compare`` (every method on one budget), ``check_serving`` (exports served by vLLM and transformers),
``report`` (= ``prunedlora-report``) and the ``bench_*`` benchmarks. Shared by them: ``_publish`` (the sections of
``docs/RESULTS.md``, the machine and command lines), ``compare_suites`` (what ``compare`` runs), ``compare_seeds``
and ``seed_stats`` (suites repeated over seeds), ``salr_layer_rows`` (``bench_salr``'s per-layer rows).

``serve_vllm.py`` is the exception: ``check_serving`` starts it by path in vLLM's own environment, where it imports
only vLLM and the standard library. This file imports nothing, so that ``python -m scripts.<name>`` works there too.
"""
