# The two commands of the README.
PYTHON ?= python3

.PHONY: demo test bench

# Run msa on a working default: a spool under ./var, a self-signed
# certificate, a demo user, submission on 127.0.0.1:2587 and :2465.
demo:
	$(PYTHON) -m pip install -q --disable-pip-version-check -e .
	$(PYTHON) bin/msa demo

# Install what the tests need (Debian packages, PyPI packages) and run them.
test:
	sh .ci/setup
	$(PYTHON) -m pytest -q -ra tests

bench:
	sh .ci/setup
	$(PYTHON) bench/run.py
