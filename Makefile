# Set-up and entry points. `make demo` and `make test` install what they need first.
PYTHON ?= python3
STAMP  := .make/installed

.PHONY: install demo reproduce test clean

# torch==2.13.0 first: a CPU build lies on the CI machines' disk; a looser requirement could pull a
# multi-GB CUDA build. An already-installed torch inside the supported range (2.11-2.14) is kept.
$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not ((2, 11) <= v < (2, 15)))" 2>/dev/null \
		|| $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev,bench]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# the whole tiny pipeline (SFT -> RM -> PPO-max -> eval -> report) on CPU, a few minutes; a second run skips
# the complete stages (add ARGS=--force to redo them)
demo: $(STAMP)
	$(PYTHON) -m rlhf_cli pipeline --config configs/tiny/pipeline.yaml $(ARGS)

# vanilla PPO vs PPO-max, 3 seeds each, from the same SFT/RM (configs/tiny/reproduce.yaml), 4-11 min on 2 cores depending on the machine
reproduce: $(STAMP)
	$(PYTHON) -m rlhf_cli pipeline --config configs/tiny/reproduce.yaml $(ARGS)

# on TEST_WORKERS pytest-xdist workers (2: one per core of the CI machines; 0 runs the suite in this process). Tests
# that share an expensive fixture stay on one worker (tests/conftest.py: xdist_group), and every worker process
# computes on one thread; on 2 cores this takes 55-65 % of the one-process time.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTHON) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --durations=15

clean:
	rm -rf runs .make .pytest_cache
