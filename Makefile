# Thin aliases for the scripts the README documents.
.PHONY: run test unit vm-test setup bench docs
setup:
	scripts/setup.sh
run:
	scripts/run.sh watch
test:
	scripts/test.sh
unit:
	.venv/bin/python -m pytest -q tests/unit tests/cli
vm-test:
	vagrant/vm-test.sh
bench:
	.venv/bin/python bench/run.py
docs:
	.venv/bin/python -m tcptrace.manpage > docs/tcptrace.8.md
