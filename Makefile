# Baton: `make demo` and `make test` do all set-up on a fresh Debian machine (as root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := mariadb-server mariadb-client sysbench haproxy libmariadb-dev pkg-config etcd-server
export PATH := $(abspath $(VENV))/bin:/usr/sbin:/sbin:$(PATH)

.PHONY: setup system-packages demo demo-fleet test fault-test fuzz compat lint bench-steady bench-hold bench-failover bench-reads bench-fleet bench-holdstart clean

setup: system-packages $(STAMP)

# Debian packages only when a tool is missing, so a second run is a no-op.
system-packages:
	@missing=""; \
	for bin in mariadbd:mariadb-server mariadb:mariadb-client sysbench:sysbench haproxy:haproxy \
	    mariadb_config:libmariadb-dev pkg-config:pkg-config etcd:etcd-server; do \
	  command -v $${bin%%:*} >/dev/null 2>&1 || missing="$$missing $${bin##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check --no-cache .

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

# The whole fault suite: every crash point of PRS and ERS, every fault test, ten minutes of
# blips that must not fail over (make test runs a short version of it).
fault-test: setup lint
	BATON_FAULT_SUITE=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_crash.py \
	  tests/test_failure.py tests/test_durability.py tests/test_unplanned.py tests/test_faultshim.py \
	  tests/test_fleet.py tests/test_etcdstore.py \
	  tests/test_truth.py tests/test_blips.py tests/test_workers.py tests/test_routing.py \
	  tests/test_pools_switch.py

# 100,000 fuzzed logins and commands against a Baton of its own (make test runs 2,000).
fuzz: setup
	$(PY) -m tests.fuzz --frames 100000

# PyMySQL's and mysql-connector-python's own test suites, directly and through Baton, compared
# test by test, into bench/results/compat.md (tests/compat.py; not part of `make test`).
# COMPAT_ARGS: more options, e.g. --base-port 22500.
compat: setup
	$(PY) -m tests.compat $(COMPAT_ARGS)

demo: setup
	$(PY) -m proxy.demo

# Three Batons on etcd: a PRS none of their clients sees, then kill -9 of one of them.
demo-fleet: setup
	$(PY) -m proxy.demo_fleet

bench-steady: setup
	$(PY) -m bench.steady

bench-hold: setup
	$(PY) -m bench.hold

bench-failover: setup
	$(PY) -m bench.failover

# The failover benchmark's read path: 10 PRS under paced reads and writes in split mode.
bench-reads: setup
	$(PY) -m bench.reads

# The failover benchmark's fleet path: three Batons on etcd, 10 PRS driven from each in turn.
bench-fleet: setup
	$(PY) -m bench.fleet

# From `ctl prs` to the first held command, the proxy busy and idle, one process and workers.
bench-holdstart: setup
	$(PY) -m bench.holdstart

clean:
	-$(VENV)/bin/baton sandbox down
	rm -rf $(VENV) .sandbox
