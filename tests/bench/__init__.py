"""Benchmarks of cohortgate (not collected by pytest): run them with `./dev bench`.

See tests/bench/README.md for what each one measures, how, and the latest figures.
"""
