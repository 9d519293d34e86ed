# Two entry points, each sets itself up on a fresh machine:
#   make demo   train a VAE on MNIST with the defaults, evaluate it, write table + figures
#   make test   run the test suite
# Both create .venv and install pyrovae with its dependencies when missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data: $PYROVAE_DATA if set, else ../shared/data when present (offline machines),
# else pyrovae's default cache folder (downloads where there is internet).
ifeq ($(origin PYROVAE_DATA), undefined)
  ifneq ($(wildcard ../shared/data/MNIST),)
    export PYROVAE_DATA := $(abspath ../shared/data)
  endif
endif
DEMO_OUT ?= runs/demo

.PHONY: demo test test-all setup clean

setup: $(VENV)/.installed

# torch and torchvision come as the matching pair pinned in pyproject.toml; the
# import check catches a torch build whose operators torchvision cannot load.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, pyro; torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'pyro', pyro.__version__)"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/pyrovae train vae --dataset mnist --binarize dynamic --z-dim 50 --hidden 400 \
	  --activation softplus --epochs 10 --batch-size 128 --lr 1e-3 \
	  --elbo TraceMeanField_ELBO --eval-samples 1000 --eval-points 2000 --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ""

clean:
	rm -rf $(VENV) runs .pytest_cache
