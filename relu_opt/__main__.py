"""`python -m relu_opt` (and `torchrun ... -m relu_opt`): the relu-opt command line."""

from relu_opt.cli import main

main()
