"""Benchmark harness for msa against a reference Postfix (``make bench``).

See ``bench/run.py`` for what is measured and how.
"""
