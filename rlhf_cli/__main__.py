"""`python -m rlhf_cli ...` is the same as `rlhf ...` (the deepspeed launcher starts workers this way)."""

from rlhf_cli.app import main

main()
