"""`python -m taskexec`: the taskexec command."""

from taskexec.cli import main

main()
