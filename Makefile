# rayfoundry: the two commands a newcomer needs are `make demo` and `make test`.
# Each creates .venv with python3 -m venv and installs the pinned dependencies when absent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= ray_apps/configs/digits_cnn.yaml
MODEL ?= digits
RUN_DIR := runs/$(basename $(notdir $(CONFIG)))

.PHONY: install demo test test-heavy test-cluster test-fast test-unit clean help cluster-up submit-train cluster-down

help:
	@echo "make demo   - train digits on a local Ray, export it, make it champion, serve it (NO_WAIT=1: exit after samples)"
	@echo "make test   - ruff, then every test but the heavy training scenarios (about 18 minutes); prints the 15 slowest"
	@echo "make test-heavy - Tune sweeps, DeepSpeed ZeRO, failure recovery (about 8 minutes); CI runs it after make test"
	@echo "make test-cluster - the multi-node suite on a simulated cluster of 4 nodes (about 9 minutes); CI runs it last"
	@echo "make test-fast - ruff, unit tests and the quick integration tests (under 5 minutes)"
	@echo "make clean  - remove run outputs (runs/, registry/)"
	@echo "make cluster-up / submit-train / cluster-down - a local Ray head with token auth; ray job submit the default job"

# torch goes in first: DeepSpeed's build imports it, so the project installs without build isolation.
# PYTHONWARNINGS=ignore keeps setuptools' editable-install banner, which a user cannot act on, off the output.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -c requirements.lock torch==2.13.0
	PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-build-isolation -c requirements.lock -e '.[dev]'
	@touch $@

install: $(STAMP)

# Train digits, export its best checkpoint (ONNX + int8, parity-checked), make it champion, serve it
# on 127.0.0.1:8000 and answer sample requests through /v1 and V2; then serve until Ctrl-C
# (NO_WAIT=1 make demo exits after the samples). Exit code 3 from export means the promotion gate
# kept the current champion: the demo still succeeds and serves that champion.
demo: $(STAMP)
	$(PY) -m ray_apps train --config $(CONFIG) --restart --json-out runs/demo_result.json
	$(PY) -m ray_apps export --checkpoint $(RUN_DIR) --name $(MODEL) --quantize int8 --promote champion \
	    --json-out runs/demo_package.json || [ $$? -eq 3 ]
	$(PY) -m ray_apps registry list $(MODEL)
	NO_WAIT=$(NO_WAIT) $(PY) -m ray_apps serve --model $(MODEL)@champion

# What CI runs first: lint, then every test but the `heavy` training scenarios, then the 15 slowest.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -m "not heavy and not cluster" --durations=15

# What CI runs second: the multi-minute training scenarios (Tune sweeps, DeepSpeed ZeRO, failure recovery).
test-heavy: $(STAMP)
	$(PY) -m pytest tests -q -m "heavy and not cluster" --durations=10

# What CI runs third: training, sweeps and serving on a simulated multi-node cluster (tests/cluster): a
# head and 3 worker nodes, each its own raylet on this machine, added and removed while the tests run.
test-cluster: $(STAMP)
	$(PY) -m pytest tests/cluster -q -m cluster --durations=10

# The edit loop (under 5 minutes): unit tests and the quick integration tests, no `slow` ones.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -m "not slow and not cluster" --durations=10

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

clean:
	rm -rf runs registry

.PHONY: bench-train bench-inference bench-serve bench-tune bench-tracking bench-monitoring
bench-train: $(STAMP)  ## training throughput (Ray Train vs torchrun vs ZeRO), step levers, SST-2 time to accuracy (~70 min)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/train_step_levers.py
	$(PY) benchmarks/time_to_accuracy.py

bench-inference: $(STAMP)  ## MiniLM inference: torch fp32/bf16 vs ONNX Runtime fp32/int8, latency and accuracy (~6 min)
	$(PY) benchmarks/inference_engines.py

bench-serve: $(STAMP)  ## HTTP load vs the offline ceiling and a hand-written server, levers, CPU; scaling events; rollouts (~19 min)
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/serve_events.py
	$(PY) benchmarks/rollout_switch.py

bench-tune: $(STAMP)  ## sweeps: ASHA vs random search on digits, per-trial overhead (~8 min)
	$(PY) benchmarks/tune_efficiency.py

bench-tracking: $(STAMP)  ## tracking: none vs MLflow vs TensorBoard on a training run; data fingerprint cost (~5 min)
	$(PY) benchmarks/tracking_overhead.py

bench-monitoring: $(STAMP)  ## serving with monitoring on vs off, SST-2 MiniLM and digits, then where its CPU goes (~9 min)
	$(PY) benchmarks/monitoring_overhead.py
	$(PY) benchmarks/monitoring_parts.py

# A local Ray head like a cluster's: token authentication on (Ray 2.60's `ray start --head` default,
# made explicit), everything on 127.0.0.1, started from the venv so jobs run its python. Then
# `ray job submit --working-dir .` uploads the repo (cluster_configs/runtime_env.yaml excludes .venv,
# data and outputs) and waits for the default training job. Its runs go to SUBMIT_STORAGE, an
# absolute path: the job runs in an unpacked copy of the working dir.
# The head starts under umask 077, so the token it may create, its logs and what its jobs write are
# readable by this user only; the token file (~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) is then set
# to mode 0600, also when an earlier `ray.init()` created it, and ~/.ray to 0700.
# The head keeps its session (logs, sockets) in RAY_TEMP_DIR, not /tmp/ray, and `cluster-down` stops
# that head's processes only: other Rays of this user on this machine keep running (`ray stop` would
# stop them all). Unix socket paths are limited to 107 bytes: keep RAY_TEMP_DIR short.
# Two ports have fixed defaults that another Ray here may hold: the dashboard agent's HTTP port (Ray's
# 52365; job submission goes through it; 0 picks a free one) and the Ray Client server's (10001).
RAY_PORT ?= 6379
DASHBOARD_PORT ?= 8265
DASHBOARD_AGENT_PORT ?= 0
RAY_CLIENT_PORT ?= 10001
RAY_TEMP_DIR ?= /tmp/rayfoundry-head-$(RAY_PORT)
SUBMIT_STORAGE ?= $(CURDIR)/runs/cluster
SUBMISSION_ID ?= rayfoundry-train-$(shell date +%Y%m%d-%H%M%S)
DASHBOARD := http://127.0.0.1:$(DASHBOARD_PORT)

cluster-up: $(STAMP)  ## local head: 2 CPUs, dashboard 127.0.0.1:$(DASHBOARD_PORT), token auth on, session in $(RAY_TEMP_DIR)
	umask 077 && PATH=$(CURDIR)/$(VENV)/bin:$$PATH RAY_AUTH_MODE=token $(VENV)/bin/ray start --head --num-cpus 2 \
	    --node-ip-address 127.0.0.1 --port $(RAY_PORT) --dashboard-host 127.0.0.1 --dashboard-port $(DASHBOARD_PORT) \
	    --dashboard-agent-listen-port $(DASHBOARD_AGENT_PORT) --ray-client-server-port $(RAY_CLIENT_PORT) \
	    --temp-dir $(RAY_TEMP_DIR) --disable-usage-stats
	@if [ -d ~/.ray ]; then chmod 700 ~/.ray; fi; token="$${RAY_AUTH_TOKEN_PATH:-$$HOME/.ray/auth_token}"; \
	    if [ -f "$$token" ]; then chmod 600 "$$token"; fi
	@echo "token: ~/.ray/auth_token (mode 0600); clients: RAY_AUTH_MODE=token ... --address $(DASHBOARD)"

submit-train: $(STAMP)  ## ray job submit the default training job to the local head and wait for it
	RAY_AUTH_MODE=token $(VENV)/bin/ray job submit --address $(DASHBOARD) --submission-id $(SUBMISSION_ID) \
	    --working-dir . --runtime-env cluster_configs/runtime_env.yaml \
	    -- python -m ray_apps train --config $(CONFIG) --set run.storage_path=$(SUBMIT_STORAGE)
	RAY_AUTH_MODE=token $(VENV)/bin/ray job status --address $(DASHBOARD) $(SUBMISSION_ID) 2>&1 | grep "Job '$(SUBMISSION_ID)' succeeded"

# cluster-down (give it the RAY_PORT or RAY_TEMP_DIR that cluster-up got): `ray stop` has no option to
# stop one head, so rayfoundry/local_head.py finds that head's processes and stops only them.

cluster-down:  ## stop the local head of RAY_TEMP_DIR, only its processes (`ray stop` stops every Ray of this user)
	$(PY) -m rayfoundry.local_head stop $(RAY_TEMP_DIR)
