# Two commands do everything: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU machines install torch from constraints-cpu.txt: on Linux the CPU build, from PyTorch's
# CPU index when it can be reached (else only a local wheel, as on this project's machines,
# fits the pin: an index pip cannot reach slows every lookup). A GPU machine sets
# CONSTRAINTS= TORCH_INDEX= (see README).
CONSTRAINTS ?= -c constraints-cpu.txt
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell $(PYTHON) -c "import urllib.request as r; r.urlopen('$(TORCH_CPU_INDEX)/', timeout=10); print('--extra-index-url $(TORCH_CPU_INDEX)')" 2>/dev/null)
STAMP := $(VENV)/.installed
# shared_protocol runs in Blender's own Python too, whose numpy is 2.x in newer Blenders, while
# bpy 4.5 holds .venv at numpy 1.26: its tests run again under the newest numpy, in a venv of
# their own with nothing else (numpy 2.3 moved a private function it used: every .npz failed).
NUMPY2_VENV := .venv-numpy2
NUMPY2_STAMP := $(NUMPY2_VENV)/.installed
NUMPY2_TESTS := tests/test_pose.py tests/test_batch_requests.py tests/test_protocol.py tests/test_protocol_fuzz.py \
	tests/test_rotations.py tests/test_skeleton.py tests/test_batch_text.py tests/test_safe_files.py

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@command -v $(PYTHON) > /dev/null || { echo "make: $(PYTHON) not found: install Python 3.11 (bpy 4.5 needs it), or name one with PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	index="$(TORCH_INDEX)"; \
	if [ -z "$$index" ] && [ -n "$(CONSTRAINTS)" ] && [ "$$(uname -s)" = Linux ]; then \
		echo "note: $(TORCH_CPU_INDEX) cannot be reached; torch==2.13.0+cpu must come from pip's own settings (a local wheel or mirror), else pass TORCH_INDEX='--extra-index-url URL'"; \
	fi; \
	$(BIN)/python -m pip install $(CONSTRAINTS) $$index -e '.[service,blender,dev]'
	touch $(STAMP)

$(NUMPY2_STAMP): pyproject.toml
	$(PYTHON) -m venv $(NUMPY2_VENV)
	$(NUMPY2_VENV)/bin/python -m pip install -U 'numpy>=2.3' 'scipy>=1.11' 'hypothesis>=6.100' 'pytest>=8'
	touch $(NUMPY2_STAMP)

# The numpy-2 venv needs the package index once: without it (offline, after the first setup)
# that step is skipped with a note, and fails only on CI.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest
	@$(MAKE) --no-print-directory $(NUMPY2_STAMP) || { [ -z "$$CI" ] && \
		echo "note: shared_protocol's tests under numpy 2 skipped: $(NUMPY2_VENV) could not be set up (no package index?)"; }
	@if [ -f $(NUMPY2_STAMP) ]; then $(NUMPY2_VENV)/bin/python -m pytest -q $(NUMPY2_TESTS); fi

demo: $(STAMP)
	$(BIN)/chatpose demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(NUMPY2_VENV) dist demo_output

# Rebuild inference_service/demo_checkpoint from nothing (corpus, renders, training, packing,
# evaluation, docs/evaluation.md); 55 to 125 minutes on a 2-core CPU (docs/evaluation.md)
.PHONY: demo-model
demo-model: $(STAMP)
	$(BIN)/python -m inference_service.training.build_demo
