# The two commands of the README:  `make demo` (main job)  and  `make test` (test suite; the GPU
# benchmark suites are collected too, so a broken one fails CI, and skip without a GPU).
PY ?= python3
# CPU machines without torch get the CPU wheel; a GPU machine keeps the torch it has (see README).
TORCH_SPEC ?= torch==2.13.0
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-fast bench report build-check clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	@$(PIP) "setuptools>=64" wheel
	$(PIP) --no-build-isolation -e ".[test]"

demo: install
	$(PY) -m nitrokernels demo

test: install
	$(PY) -m pytest tests benchmarks -q -ra

# Everything but the slow end-to-end tests, for quick iteration.
test-fast:
	$(PY) -m pytest tests -q -m "not slow"

bench: install
	$(PY) -m nitrokernels bench --report

report:
	$(PY) benchmarks/report.py

build-check:
	$(PY) -m nitrokernels.build_check

clean:
	rm -rf build dist *.egg-info nitrokernels/_C*.so nitrokernels/_build_info.json nitro-demo
