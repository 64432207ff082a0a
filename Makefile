# Two entry points: `make run` starts the node, `make test` runs the whole suite against real peers.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= config/gateway.toml
# Debian packages the tests talk to: command (or absolute path of a file) that proves presence -> package.
# invesalius-examples has no command: its head CT (tests/realct.py) is the proof.
TEST_PEERS := /usr/lib/python3.11/ensurepip/__init__.py:python3.11-venv storescu:dcmtk dcmcjpls:dcmtk Orthanc:orthanc plastimatch:plastimatch dciodvfy:dicom3tools \
	/usr/share/doc/invesalius-examples/examples/Cranium.inv3:invesalius-examples systemd-analyze:systemd

.PHONY: run test venv dev peers lint typecheck bench clean install demo liver

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# torch's CPU wheel for the [nnunet] extra (PyPI's Linux wheel pulls in gigabytes of CUDA libraries);
# pip falls back to the configured indexes when this one cannot be reached.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --retries 0 --extra-index-url $(TORCH_INDEX) 'torch==2.13.0'
	$(PY) -m pip install --quiet -e '.[dev,nnunet]'
	touch $@

# A real Triton Inference Server for the farm tests and benchmarks: NVIDIA's tritonserver with its Python backend,
# from the nvidia-pytriton wheel, in a venv of Debian's own Python 3.11 (the backend stub links libpython3.11).
TRITON_VENV := .venv-triton
TRITON_PYTHON ?= /usr/bin/python3.11

$(TRITON_VENV)/.installed: pyproject.toml
	$(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet -e '.[triton-server]'
	touch $@

venv: $(VENV)/.installed

dev: $(VENV)/.dev-installed $(TRITON_VENV)/.installed

# A development master key, made explicitly (the node never creates one): outside data_dir, git-ignored.
DEV_KEY := .keys/master.key

run: venv
	test -f $(DEV_KEY) || $(PY) -m gateway keygen --out $(DEV_KEY)
	$(PY) -m gateway serve --config $(CONFIG)

peers:
	@missing=""; for pair in $(TEST_PEERS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  case $$cmd in /*) test -e $$cmd ;; *) command -v $$cmd >/dev/null 2>&1 ;; esac || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Three pytest workers, each taking whole files (module fixtures stay in one process): most tests wait on real
# peers, node processes and Triton servers, so three overlap well even on 2 CPUs (measured: 12.5 min, 166 % CPU,
# against 15.2 min with two workers).
test: peers dev
	$(PY) -m ruff check gateway tests scripts
	$(PY) -m mypy
	$(PY) -m pytest -n 3 --dist loadfile

lint: dev
	$(PY) -m ruff check gateway tests scripts
	$(PY) -m mypy

# A phantom through a local node to a local receiving SCP; prints the structures, writes demo-output/qa-phantom.png.
demo: venv
	$(PY) scripts/demo.py --out demo-output

# The published whole-liver network (pyliverlesionseg 0.3, Apache-2.0) as models/liver; downloads its wheel.
liver: dev
	$(PY) scripts/import_pyliverlesionseg.py --out models/liver

bench: peers dev
	$(PY) scripts/bench_ingest.py
	$(PY) scripts/bench_deidentify.py
	$(PY) scripts/bench_infer.py
	$(PY) scripts/bench_rtstruct.py
	$(PY) scripts/bench_e2e.py
	$(PY) scripts/bench_tls.py
	$(PY) scripts/bench_liver.py
	$(PY) scripts/bench_farm.py

clean:
	rm -rf $(VENV) $(TRITON_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# A system install (as root): /opt/contour-gateway, a dedicated user, /etc/contour-gateway, the systemd unit.
PREFIX ?= /opt/contour-gateway
install:
	id -u contour-gw >/dev/null 2>&1 || useradd --system --home-dir /var/lib/contour-gateway --shell /usr/sbin/nologin contour-gw
	install -d -m 0755 $(PREFIX)
	cp -r gateway models pyproject.toml README.md docs $(PREFIX)/
	$(PYTHON) -m venv $(PREFIX)/.venv
	$(PREFIX)/.venv/bin/pip install --quiet $(PREFIX)
	install -d -m 0750 -g contour-gw /etc/contour-gateway
	test -f /etc/contour-gateway/gateway.toml || install -m 0640 -g contour-gw deploy/gateway.toml /etc/contour-gateway/gateway.toml
	install -d -o contour-gw -g contour-gw -m 0700 /var/lib/contour-gateway /var/lib/contour-gateway-keys
	install -m 0644 deploy/contour-gateway.service deploy/contour-gateway-shred.service \
	  deploy/contour-gateway-shred.timer /etc/systemd/system/
	-systemctl daemon-reload
	-systemctl enable --now contour-gateway-shred.timer
	@test -f /etc/contour-gateway/env || { \
	  echo "no master key yet: the node refuses to start and the retention sweep fails without one. Create it once:"; \
	  echo "  $(PREFIX)/.venv/bin/python -m gateway keygen --env-file /etc/contour-gateway/env"; \
	  echo "  chown root:contour-gw /etc/contour-gateway/env && chmod 0640 /etc/contour-gateway/env"; }
	@echo "installed; the retention sweep runs on its own timer, node or not: systemctl list-timers contour-gateway-shred.timer"
	@echo "edit /etc/contour-gateway/gateway.toml, then: systemctl enable --now contour-gateway"
