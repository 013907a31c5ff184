# bucketchat: two commands on a fresh machine.
#   make demo   creates .venv, installs, runs the pipeline on the bundled sample, asks a few questions
#   make test   creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

QUESTIONS := "I forgot my password, what do I do?" \
             "how long do I boil an egg for a runny yolk" \
             "python says ModuleNotFoundError: No module named yaml" \
             "my parcel still hasn't arrived" \
             "which debt should I pay off first?" \
             "who won the football world cup in 1954?"

.PHONY: install demo test test-fast bench-banking77 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bucketchat pipeline --data conversation_data.sample.jsonl
	@printf '%s\n' $(QUESTIONS) | $(BIN)/bucketchat chat --echo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# BANKING77 response accuracy through the same pipeline + chat a user runs (needs ../shared/data).
bench-banking77: $(STAMP)
	$(BIN)/python tests/bench/banking77.py

clean:
	rm -rf .bucketchat
