# The two commands of the README:
#   make quickstart   set up (venv, pinned packages, Fashion-MNIST), search, export
#   make test         set up, then run the test suite (slow tests excluded)
#   make quickstart-one-shot   the same data, gallery and budget, searched one-shot over prunings of the gallery model
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data quickstart quickstart-one-shot test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

quickstart: setup data
	$(BIN)/nas search experiments/quickstart.yaml
	$(BIN)/nas export --study-name quickstart --run-dir runs/quickstart --out runs/quickstart/export
	@echo
	@echo "Exported query network: runs/quickstart/export (MODEL_CARD.md, arch.json, weights.safetensors, model.onnx, model.torchscript.pt)"
	@echo "Browse the trials:      $(BIN)/nas ui --study-name quickstart   (MLflow UI on http://127.0.0.1:5000)"

quickstart-one-shot: setup data
	$(BIN)/nas search experiments/quickstart_one_shot.yaml
	$(BIN)/nas export --study-name quickstart-one-shot --run-dir runs/quickstart --out runs/quickstart/export-one-shot
	@echo
	@echo "Exported query network: runs/quickstart/export-one-shot (a pruning of the ResNet-18 gallery model)"

test: setup
	$(BIN)/python -m pytest

test-slow: setup data
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium \
	  || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)
	$(BIN)/pip install --quiet -e '.[test,browser]'
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf runs
