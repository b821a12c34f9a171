# One command for the demo, one for the tests; both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_TIME ?= 3m

.PHONY: demo test install dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip -q

install: $(BIN)/python
	$(BIN)/pip install -e . -q

dev: $(BIN)/python
	$(BIN)/pip install -e '.[dev]' -q

# Train the default (spatial) model on the built-in procedural faces for a few minutes on CPU, its second-stage
# prior in the last third, then draw samples from that prior. 32 px: on a slow 2-core CPU, 3 minutes at 64 px
# are too few steps for faces with features.
demo: install
	$(BIN)/python examples/faces.py examples-data --count 2000 --size 32 --seed 0 > /dev/null
	$(BIN)/vaetool train examples-data -o runs/faces --time $(DEMO_TIME) --image-size 32 --force
	$(BIN)/vaetool sample runs/faces -n 64 -o out/samples --grid out/samples.png --force > /dev/null
	@echo "samples: out/samples.png, training grids: runs/faces/grids/"

test: dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs out examples-data .pytest_cache
