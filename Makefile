# b2t-bench: `make` (or `make help`) lists what is here.
# The CLI behind these targets is main.py (docs/contracts.md); this file only strings it together.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
PY := .venv/bin/python
NPROC ?= 1
# NPROC > 1: one process per device under torchrun (DDP); unset or 1: plain python
ifeq ($(filter-out 1,$(NPROC)),)
LAUNCH ?= $(PY)
else
LAUNCH ?= .venv/bin/torchrun --standalone --nproc_per_node=$(NPROC)
endif
LAUNCHER ?= local
ARGS ?=
RUNS ?=
SETUP_ARGS ?=

# Real files that stand for "done", so work happens only when it is missing or out of date.
STAMP := .venv/.b2t-setup-stamp
DEV_STAMP := .venv/.b2t-setup-dev-stamp
SYNTH_DIR := data/synthetic
SYNTH_REPORT := $(SYNTH_DIR)/synth_report.json
COMPARE_OUT := results/comparison
GPU_CHECK_OUT := results/gpu_check
PROTOCOLS_OUT ?= results/protocols
PROTOCOL_CONFIG ?= configs/ctc_baseline/tiny.yml

DATA_DEST ?= data/b2txt25

.PHONY: help setup test synth data ctc-baseline gru-align llm-decoder compare gpu-check clean distclean \
	protocols protocol-cross-session protocol-recalibration protocol-data-scaling

define HELP
b2t-bench make targets

  help          this text (the default)
  setup         create .venv and install b2t-bench editable (pip install -e .: the `b2t` command) with
                its dependencies (bash setup.sh; SETUP_ARGS=--dev adds pytest, ruff, jiwer; --force reinstalls)
  test          install the dev extra (bash setup.sh --dev), lint (ruff check .) and run the test
                suite: $(PY) -m pytest -q tests (slurm tests: B2T_TEST_SLURM=install; the slow tests:
                B2T_TEST_ALL=1, as CI sets; see README "Setup details")
  synth         make the embedded synthetic dataset in $(SYNTH_DIR) (once; `make clean` removes it)
  data          download the real Brain-to-Text '25 data and baseline checkpoint from Dryad into
                $(DATA_DEST) (needs DRYAD_TOKEN or DRYAD_CLIENT_ID + DRYAD_CLIENT_SECRET; README "Data")
  ctc-baseline  train + evaluate the CTC phoneme baseline   (configs/ctc_baseline/ctc_baseline.yml)
  gru-align     train + evaluate the audio-aligned GRU      (configs/gru_align/gru_align.yml)
  llm-decoder   train + evaluate the LLM-decoded variant    (configs/llm_decoder/llm_decoder.yml)
  compare       compare finished runs into $(COMPARE_OUT)
  protocols     the three protocols below on the embedded data with $(PROTOCOL_CONFIG), each a run group
                in $(PROTOCOLS_OUT)/<protocol> with summary.md and summary.png (README "Protocols");
                each call replaces the folder it writes (--overwrite)
  protocol-cross-session   train on the first 5 sessions, decode the last 3; seeds 1,2,3
  protocol-recalibration   the same cut, then each held-out session's day layer fine-tuned on k = 0, 5, 10,
                           20 of its sentences (2 draws, 40 steps each)
  protocol-data-scaling    train on 25%, 50%, 100% of each session's training trials
  gpu-check     check every GPU path once (bf16, torch.compile and its recompilations, cuDNN packing,
                the 7B-shaped LLM step, NCCL) on random data, at most 8 min; one table, also in
                $(GPU_CHECK_OUT).md/.json (benchmarks/gpu_check.py). Without a GPU: says so, exits 0
  clean         remove generated data ($(SYNTH_DIR)), .cache/, __pycache__, .pytest_cache, build leftovers
                (keeps results/ and .venv)
  distclean     clean, and remove .venv too

Variables (make TARGET NAME=value)
  PYTHON        interpreter that creates .venv            [$(PYTHON)]
  NPROC         processes (devices) per run               [$(NPROC)]
                N > 1: torchrun --standalone --nproc_per_node=N (DDP: NCCL on GPUs, gloo on CPU)
  LAUNCH        how a run starts (overrides NPROC)        [$(LAUNCH)]
                e.g. LAUNCH=".venv/bin/torchrun --nnodes=2 --nproc_per_node=4 ..."
  LAUNCHER      local: run here; slurm: submit a job      [$(LAUNCHER)]
                slurm resources: the config's slurm: section, ARGS="--set slurm.gpus_per_node=4"
  ARGS          extra arguments for main.py run / compare [$(ARGS)]
                e.g. ARGS="--set training_params.num_steps=100", or for compare ARGS=--force
                (gpu-check: benchmarks/gpu_check.py's, e.g. ARGS="--items a b")
  PROTOCOL_CONFIG  the config the protocol targets run     [$(PROTOCOL_CONFIG)]
  PROTOCOLS_OUT    where the protocol targets write        [$(PROTOCOLS_OUT)]
  RUNS          run folders for compare                   [every finished run under results/]
  SETUP_ARGS    arguments for setup.sh, e.g. --force      [$(SETUP_ARGS)]
  DATA_DEST     where `make data` puts the real data       [$(DATA_DEST)]
  TORCH_INDEX_URL  (environment) extra index for torch, e.g. a CUDA wheel index; see setup.sh
endef
export HELP

help:
	@echo "$$HELP"

# `make setup` always asks setup.sh (which says "already set up" when nothing changed);
# other targets depend on the stamp, so they set up only when it is missing or stale.
setup:
	PYTHON="$(PYTHON)" bash setup.sh $(SETUP_ARGS)

$(STAMP): setup.sh pyproject.toml constraints.txt
	PYTHON="$(PYTHON)" bash setup.sh

# The dev extra (pytest, ruff, jiwer) on top: only the tests need it.
$(DEV_STAMP): setup.sh pyproject.toml constraints.txt
	PYTHON="$(PYTHON)" bash setup.sh --dev

test: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

synth: $(SYNTH_REPORT)

# Always asks main.py download, which fetches only what is missing (and says what is in place).
data: $(STAMP)
	$(PY) main.py download --dest $(DATA_DEST) $(ARGS)

# Order-only on the stamp: reinstalling packages does not regenerate the data.
$(SYNTH_REPORT): | $(STAMP)
	$(PY) main.py synth --out $(SYNTH_DIR)

# One run target per model: $(1) is the make target, $(2) the model folder and config name.
# A model whose config does not exist yet says so instead of failing somewhere deeper.
define MODEL_RUN
ifneq ($$(wildcard configs/$(2)/$(2).yml),)
$(1): $$(STAMP) $$(SYNTH_REPORT)
	$$(LAUNCH) main.py run --config configs/$(2)/$(2).yml --launcher $$(LAUNCHER) $$(ARGS)
else
$(1):
	@echo "$(1): configs/$(2)/$(2).yml is missing" >&2; exit 2
endif
endef
$(eval $(call MODEL_RUN,ctc-baseline,ctc_baseline))
$(eval $(call MODEL_RUN,gru-align,gru_align))
$(eval $(call MODEL_RUN,llm-decoder,llm_decoder))

# Without RUNS, main.py compare takes every run under results/ and lists the unfinished ones.
compare: $(STAMP)
	$(PY) main.py compare $(RUNS) --out $(COMPARE_OUT) $(ARGS)

# Each protocol is a run group (harness/groups.py) in its own folder, replaced on every call.
protocols: protocol-cross-session protocol-recalibration protocol-data-scaling

protocol-cross-session: $(STAMP) $(SYNTH_REPORT)
	$(PY) main.py run --config $(PROTOCOL_CONFIG) --out $(PROTOCOLS_OUT)/cross_session --overwrite --seeds 1,2,3 \
		--set evaluation.protocol=cross_session --set evaluation.held_out.last_sessions=3 $(ARGS)

protocol-recalibration: $(STAMP) $(SYNTH_REPORT)
	$(PY) main.py run --config $(PROTOCOL_CONFIG) --out $(PROTOCOLS_OUT)/recalibration --overwrite \
		--set evaluation.protocol=recalibration --set evaluation.held_out.last_sessions=3 \
		--set "evaluation.recalibration.k=[0,5,10,20]" --set evaluation.recalibration.draws=2 \
		--set evaluation.recalibration.steps=40 $(ARGS)

protocol-data-scaling: $(STAMP) $(SYNTH_REPORT)
	$(PY) main.py run --config $(PROTOCOL_CONFIG) --out $(PROTOCOLS_OUT)/data_scaling --overwrite \
		--set evaluation.protocol=data_scaling $(ARGS)

# Needs no data: every item makes its own random batches.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(ARGS)

clean:
	rm -rf $(SYNTH_DIR) .cache .pytest_cache b2t_bench.egg-info build
	find . -path ./.venv -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv
