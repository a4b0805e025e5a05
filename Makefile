# Set-up and entry points. `make demo` and `make test` install what they need first.
PYTHON ?= python3
STAMP  := .make/installed

.PHONY: install demo test clean

# torch==2.13.0 first: a CPU build lies on the CI machines' disk; a looser requirement could pull a
# multi-GB CUDA build. An already-installed torch inside the supported range (2.11-2.14) is kept.
$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not ((2, 11) <= v < (2, 15)))" 2>/dev/null \
		|| $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m rlhf_cli sft --config configs/tiny/sft.yaml --overwrite

test: $(STAMP)
	$(PYTHON) -m pytest tests

clean:
	rm -rf runs .make .pytest_cache
