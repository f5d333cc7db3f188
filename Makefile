# The two commands of the README. Both make and use a virtual environment
# in the project, .venv, from Debian's own Python (PYTHON=...: another);
# Debian refuses pip installs into its system Python (PEP 668).
PYTHON ?= /usr/bin/python3
VENV ?= .venv
export PYTHON VENV

.PHONY: demo test bench

# Run msa on a working default: a spool under ./var, a self-signed
# certificate, a demo user, submission on 127.0.0.1:2587 and :2465.
demo:
	sh .ci/setup demo
	$(VENV)/bin/python3 bin/msa demo

# Install what the tests need (Debian packages, PyPI packages) and run them.
test:
	sh .ci/setup test
	$(VENV)/bin/python3 -m pytest -q -ra tests

bench:
	sh .ci/setup test
	$(VENV)/bin/python3 bench/run.py
