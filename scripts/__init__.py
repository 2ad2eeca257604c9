"""Scripts of the checkout: `python -m scripts.demo` (`make demo`), `scripts/golden.py`, and the shell scripts
that build the environment and the local Slurm cluster. A package so that the demo runs with `-m` from the
root and imports the launch harness (tests/helpers/launch.py) without touching sys.path."""
