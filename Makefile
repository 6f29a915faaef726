# Two commands do everything: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU machines install torch from constraints-cpu.txt; a GPU machine sets CONSTRAINTS= (see README).
CONSTRAINTS ?= -c constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(CONSTRAINTS) -e '.[service,blender,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/chatpose demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) dist demo_output

# Rebuild inference_service/demo_checkpoint from nothing (corpus, renders, training, packing,
# evaluation, docs/evaluation.md); 46 to 64 minutes on a 2-core CPU, by the machine's load
# (docs/evaluation.md).
.PHONY: demo-model
demo-model: $(STAMP)
	$(BIN)/python -m inference_service.training.build_demo
