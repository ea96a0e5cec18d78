# Quick start: `make demo` (run the main job) and `make test` (run the full test suite).
.PHONY: setup demo test unit stack-up stack-down lint

setup:
	bash scripts/setup.sh

demo: setup
	stream stack up
	stream demo

test:
	bash scripts/test.sh

unit:
	python3 -m pytest -m "not integration"

stack-up:
	stream stack up

stack-down:
	stream stack down

lint:
	ruff check stream tests load_tests
	mypy stream
