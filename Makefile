# The two commands a newcomer needs (both set up .venv/ first when needed):
#   make demo   train and evaluate Mask R-CNN GroupMamba-T on a small generated dataset (CPU)
#   make test   run the test suite
.PHONY: install demo test

install:
	bash tools/setup_env.sh

demo: install
	bash tools/quickstart.sh

test: install
	.venv/bin/python -m pytest tests -q -p no:cacheprovider
