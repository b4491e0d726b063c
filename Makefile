# Everything runs from the project root inside .venv; nothing is installed
# into site-packages (a top-level `datasets` package would shadow others).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv test test-all demo lint format clean gpu-check gpu-check-smoke

venv: $(STAMP)

# torch goes in first and pinned, so that no later requirement can make pip
# resolve a newer torch with its CUDA wheels.
$(STAMP): requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

# The optional experiment trackers (mlflow, wandb), for `make test` only (training, the
# demo and TensorBoard do not need them). A constraint holds torch at its pin: pip
# refuses rather than replacing it. If they cannot be installed, tests/trainer/test_tracking.py
# skips its backend tests and says why.
TRACKING_STAMP := $(VENV)/.tracking-stamp
$(TRACKING_STAMP): requirements-tracking.txt | $(STAMP)
	echo "torch==2.13.0" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet -r requirements-tracking.txt -c $(VENV)/torch-constraint.txt \
	  || echo "warning: mlflow/wandb not installed; tests/trainer/test_tracking.py skips their tests"
	touch $@

# The GPU check's CPU smoke run comes first (so that bench/gpu_check/ never rots),
# and pytest's summary is the last thing printed.
test: $(STAMP) $(TRACKING_STAMP)
	$(MAKE) --no-print-directory gpu-check-smoke
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache

# ---------------------------------------------------------------------------
# CPU demo: synthetic faces (generated once, again if the generator changes),
# 2 ranks under torchrun, held-out verification before/after, ONNX export checked
# against PyTorch. The output directory is recreated on every run.
DEMO_DATA ?= data/synthetic
DEMO_OUT  ?= work_dirs/demo
DEMO_RANKS ?= 2

$(DEMO_DATA)/meta.json: datasets/synthetic.py | $(STAMP)
	@echo "== generating the synthetic dataset in $(DEMO_DATA)"
	$(BIN)/python -m datasets.synthetic $(DEMO_DATA) --pairs-per-fold 100 --workers 2

demo: $(STAMP) $(DEMO_DATA)/meta.json
	@set -e; start=$$(date +%s); \
	rm -rf $(DEMO_OUT); \
	echo "== training configs/demo on $(DEMO_RANKS) CPU ranks -> $(DEMO_OUT)"; \
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(DEMO_RANKS) \
	  train_dist.py configs/demo data.root=$(DEMO_DATA) train.output=$(DEMO_OUT); \
	echo "== exporting the backbone to ONNX"; \
	$(BIN)/python -m eval.export_onnx --network mbf_tiny \
	  --checkpoint $(DEMO_OUT)/backbone.pt --output $(DEMO_OUT)/backbone.onnx; \
	echo "== summary"; \
	$(BIN)/python -m trainer.report $(DEMO_OUT); \
	echo "training, verification and export took $$(( $$(date +%s) - start )) s"

# ---------------------------------------------------------------------------
# Fine-tuning demo (docs/training.md, "Fine-tuning"): pretrain mbf_tiny on the demo's
# identities, fine-tune on 50 new ones (generated once into FT_DEMO_DATA) with a
# random and an imprinted head, train from scratch for as many steps; verification
# on the new identities' held-out pairs before and after. Table and
# $(FT_DEMO_OUT)/finetune_demo.json at the end.
FT_DEMO_DATA ?= data/synthetic_new
FT_DEMO_OUT  ?= work_dirs/finetune_demo

# Distillation demo (docs/training.md "Distillation"): a teacher trained and stored by
# the demo, its cache, and four students of the same steps (alone, embedding and
# relation distillation online, embedding distillation from the cache).
# Its data: 200 of the synthetic identities x 30 images (half the demo's), so that a
# teacher, its cache and four students fit in 6 minutes on 2 cores.
DISTILL_DEMO_DATA ?= data/synthetic_distill
DISTILL_DEMO_OUT ?= work_dirs/distill_demo

$(DISTILL_DEMO_DATA)/meta.json: datasets/synthetic.py | $(STAMP)
	@echo "== generating the distillation demo's synthetic dataset in $(DISTILL_DEMO_DATA)"
	$(BIN)/python -m datasets.synthetic $(DISTILL_DEMO_DATA) --identities 200 \
	  --pairs-per-fold 100 --workers 2

.PHONY: distill-demo
distill-demo: $(STAMP) $(DISTILL_DEMO_DATA)/meta.json
	@set -e; start=$$(date +%s); \
	rm -rf $(DISTILL_DEMO_OUT); \
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(DEMO_RANKS) \
	  -m tools.distill_demo --data $(DISTILL_DEMO_DATA) --out $(DISTILL_DEMO_OUT); \
	echo "the distillation demo took $$(( $$(date +%s) - start )) s (data generation included when it ran)"

.PHONY: finetune-demo
finetune-demo: $(STAMP) $(DEMO_DATA)/meta.json
	@set -e; start=$$(date +%s); \
	rm -rf $(FT_DEMO_OUT); \
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(DEMO_RANKS) \
	  -m tools.finetune_demo --pretrain-data $(DEMO_DATA) --new-data $(FT_DEMO_DATA) \
	  --out $(FT_DEMO_OUT); \
	echo "the fine-tuning demo took $$(( $$(date +%s) - start )) s"

# ---------------------------------------------------------------------------
# Reliability (docs/reliability.md). multinode-test: two torchrun agents as two
# nodes, on loopback and (as root with `ip netns`) in two network namespaces
# joined by a veth pair. soak: the demo config for SOAK_STEPS steps on 2 ranks
# (default 2000; not in CI; figures in work_dirs/soak/soak.json).
# slurm-test (docs/training.md, "Slurm"): installs slurm-wlm when run as root, starts
# slurmctld + slurmd on localhost, runs tools/slurm/train.sbatch as a 2-task CPU job and
# a preempted-then-requeued one; skips with a reason where Slurm cannot start.
.PHONY: slurm-test
slurm-test: $(STAMP)
	bash tools/slurm/local_test.sh

.PHONY: multinode-test soak
multinode-test: $(STAMP)
	$(BIN)/python -m pytest -m "" -v -s tests/trainer/test_multinode.py

SOAK_STEPS ?= 2000
soak: $(STAMP) $(DEMO_DATA)/meta.json
	SOAK_STEPS=$(SOAK_STEPS) SOAK_DATA=$(DEMO_DATA) $(BIN)/python -m pytest -m slow -s --timeout=0 tests/trainer/test_soak.py

# ---------------------------------------------------------------------------
# GPU check (docs/benchmarks.md, "GPU check"): on a machine with one CUDA GPU whose
# system Python already has the requirements; no venv, no pip, no network:
#   PYTHON=python3 make gpu-check
# CUDA tests, head / training / loader figures against the goals, in at most 8 minutes;
# gpu_check.json and gpu_check.md land in GPU_CHECK_OUT. gpu-check-smoke runs the same
# script on the CPU at tiny sizes inside .venv (part of `make test`).
GPU_CHECK_OUT ?= work_dirs/gpu_check
GPU_CHECK_SMOKE_OUT ?= work_dirs/gpu_check_smoke

gpu-check:
	$(PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT)

gpu-check-smoke: $(STAMP)
	$(BIN)/python -m bench.gpu_check --smoke --out $(GPU_CHECK_SMOKE_OUT)

# ---------------------------------------------------------------------------
# Mutation testing (docs/testing.md; not part of `make test`): tools/mutation.py plants one
# bug at a time (AST operator swaps, constants +1, removed statements) in partial_fc/, the
# checkpoint code, the dataset formats, eval/metrics.py and the face alignment, and runs
# the tests mapped to each module in mutation/config.toml on a copy of the tree. A seeded
# sample sized to MUTATION_MINUTES; kill rate per package and the survivors are printed and
# written to work_dirs/mutation/report.md. mutation-planted re-checks the hand-planted bugs
# of mutation/planted.toml (each caught by its tests, which pass without it).
MUTATION_MINUTES ?= 30

.PHONY: mutation mutation-planted
mutation: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/python -m tools.mutation --budget-minutes $(MUTATION_MINUTES)

mutation-planted: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/python -m tools.mutation --planted mutation/planted.toml \
	  --out work_dirs/mutation-planted
