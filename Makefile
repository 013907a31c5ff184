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

.PHONY: install browser demo lint format test test-fast prefect-up prefect-down bench bench-banking77 bench-data bench-train bench-latency bench-serve bench-oos bench-sample clean

# constraints.txt pins every transitive package to the versions the suite passed with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bucketchat pipeline --data conversation_data.sample.jsonl
	@printf '%s\n' $(QUESTIONS) | $(BIN)/bucketchat chat --echo
	@echo
	@echo "bucketchat is installed in .venv/bin. To call it by name from this shell:"
	@echo "  source .venv/bin/activate      # or: export PATH=\"$(CURDIR)/.venv/bin:\$$PATH\""
	@echo "Then: bucketchat chat, bucketchat serve, or train on your own file (README, 'Your own data'):"
	@echo "  bucketchat pipeline --data tickets.csv --user_col question --assistant_col answer"

# The chat page test drives Debian's Chromium with Playwright (no browser download); install it if
# it is missing and we may (root with apt-get), else the test says it is skipped and why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  echo "note: chromium not installed; the browser test will be skipped (apt-get install chromium)"

# Lint and format are part of the tests: `make format` fixes what ruff can.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two (at most four) test processes: most tests wait on subprocesses, servers and the disk, so two
# cores run the suite in ~2/3 of the time one process takes.
test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Every benchmark, one Markdown report with PNG plots in bench-report/ (git-ignored); about an hour
# with REPEATS=3. Needs ../shared/data/banking77 beside the checkout.
REPEATS ?= 3
bench: $(STAMP)
	$(BIN)/python tests/bench/report.py --repeats $(REPEATS)

# Response accuracy, pipeline wall time and chat latency through the commands a user runs.
# BANKING77 needs ../shared/data beside the checkout; bench-sample uses the bundled sample.
bench-banking77: $(STAMP)
	$(BIN)/python tests/bench/accuracy.py --repeats 3
	$(BIN)/python tests/bench/accuracy.py --repeats 3 --train ../shared/data/banking77/train_10shot.jsonl

bench-data: $(STAMP)
	$(BIN)/python tests/bench/data.py --repeats 3

bench-train: $(STAMP)
	$(BIN)/python tests/bench/training.py --repeats 3

# Chat latency on a 100k-row table vs SQLite FTS5 + numpy; server requests/s; out-of-scope fallback.
bench-latency: $(STAMP)
	$(BIN)/python tests/bench/latency.py

bench-serve: $(STAMP)
	$(BIN)/python tests/bench/serve.py

bench-oos: $(STAMP)
	$(BIN)/python tests/bench/oos.py

bench-sample: $(STAMP)
	$(BIN)/python tests/bench/accuracy.py --repeats 3 --train conversation_data.sample.jsonl --test conversation_data.sample.jsonl

# A local Prefect server (UI on 127.0.0.1:4200), the bucketchat-process pool, every deployment in
# prefect.yaml and a process worker, in the background; prefect-down stops them (ops/local-prefect.sh).
prefect-up: $(STAMP)
	ops/local-prefect.sh up

prefect-down:
	ops/local-prefect.sh down

clean:
	rm -rf .bucketchat
