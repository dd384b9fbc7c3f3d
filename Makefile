# skyfuse: `make run` runs the main job, `make test` runs every test. Both set up what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
KAFKA_TLS_DIR ?= .skyfuse/kafka-tls
KAFKA_TLS := $(KAFKA_TLS_DIR)/ca.pem

.PHONY: help install lint run run-emulated test test-clock-shift test-unit test-package chaos bench bench-quality package kafka-tls kafka-up kafka-down emulators-up emulators-down status clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "skyfuse needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cli,train,otlp,test]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install skyfuse with its test tools

run: install  ## the main job: train on breast cancer split over three clouds, fuse, compare with centralized
	$(BIN)/skyfuse demo

run-emulated: install $(KAFKA_TLS)  ## the main job on Apache Kafka and the cloud emulators (LocalStack S3, fake-gcs-server, Azurite)
	bash infra/kafka/kafka.sh up
	bash infra/emulators/emulators.sh up || { bash infra/kafka/kafka.sh down; exit 1; }
	$(BIN)/skyfuse demo --emulate; rc=$$?; bash infra/emulators/emulators.sh down; bash infra/kafka/kafka.sh down; exit $$rc

# Decisions must not depend on the date: these run again with the process clock a year ahead.
CLOCK_TESTS := tests/unit/test_scheduling.py tests/unit/test_scheduling_clock.py tests/unit/test_inference_metrics.py \
               tests/integration/test_scheduler_time.py tests/integration/test_placement.py

lint: install  ## ruff and mypy (pyproject.toml); both must report nothing (shellcheck runs in the unit tests)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install lint $(KAFKA_TLS)  ## lint, then every test, against a real Kafka broker and the storage emulators started (and stopped) here
	bash infra/kafka/kafka.sh up
	bash infra/emulators/emulators.sh up || { bash infra/kafka/kafka.sh down; exit 1; }
	$(BIN)/pytest $(PYTEST_ARGS) && $(MAKE) --no-print-directory test-clock-shift; rc=$$?; \
	  bash infra/emulators/emulators.sh down; bash infra/kafka/kafka.sh down; exit $$rc

test-clock-shift: install  ## the scheduler, placement and metrics tests with the process clock moved a year ahead
	$(BIN)/pytest -q $(CLOCK_TESTS) --clock-shift-days=365

test-unit: install  ## the tests that need no server
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

chaos: install $(KAFKA_TLS)  ## 30 shards on Apache Kafka while hosts are SIGKILLed every few seconds and the broker restarts; a ledger checks every effect
	bash infra/kafka/kafka.sh up
	$(BIN)/python -m tests.chaos.chaos --shards 30 --broker-restart; rc=$$?; bash infra/kafka/kafka.sh down; exit $$rc

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $@

bench: $(VENV)/.bench  ## the suite: serving, cold start, fusion, bus, pipeline, scheduler against floors and peers; bench/results.json + growth.png
	$(BIN)/python bench/suite.py

bench-quality: install  ## fusion quality over 5 seeds, placement policy vs. baselines, hot-path costs
	$(BIN)/python bench/fusion_quality.py
	$(BIN)/skyfuse simulate
	$(BIN)/python bench/micro.py

# Packaging (infra/package/README.md): the wheel and each cloud's inference artifact, in build/package/.
SAM_VENV := build/tools/sam
# SAM=sam: the SAM CLI on PATH; SAM=none: infra/package/aws/Makefile without it (no template validation)
SAM ?= $(SAM_VENV)/bin/sam

$(SAM_VENV)/bin/sam:
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --upgrade pip
	$(SAM_VENV)/bin/pip install --quiet aws-sam-cli

package: install $(filter $(SAM_VENV)/bin/sam,$(SAM))  ## build/package/: the wheel; the AWS inference Lambda (sam build), the GCP source folder, the Azure app folder; their sizes
	$(BIN)/python infra/package/build.py --sam $(SAM)

test-package: install  ## the wheel installed with [serve,aws,local] into a clean venv outside the checkout serves a model
	$(BIN)/pytest -m package tests/integration/test_package.py $(PYTEST_ARGS)

emulators-up: install  ## install (first time) and start LocalStack (S3), fake-gcs-server and Azurite on 127.0.0.1; create the buckets
	bash infra/emulators/emulators.sh up

emulators-down:  ## stop the storage emulators (their objects live in memory only)
	bash infra/emulators/emulators.sh down

$(KAFKA_TLS):
	bash infra/kafka/kafka.sh certs

kafka-tls: $(KAFKA_TLS)  ## the broker's local CA, TLS certificate and SCRAM password, in .skyfuse/kafka-tls (infra/kafka/SECURITY.md)

kafka-up: $(KAFKA_TLS)  ## install (first time) and start the single-node Apache Kafka broker: 127.0.0.1:9092, SASL_SSL on :9094
	bash infra/kafka/kafka.sh up

kafka-down:  ## stop the broker (its data stays in .skyfuse/kafka)
	bash infra/kafka/kafka.sh down

status: install  ## topics, lag per function and cloud, dead letters
	$(BIN)/skyfuse status

clean:  ## remove the venv, the local bus and stores, the broker's and emulators' data
	-bash infra/kafka/kafka.sh down --purge
	-bash infra/emulators/emulators.sh down --purge
	rm -rf $(VENV) .skyfuse .pytest_cache build/package
