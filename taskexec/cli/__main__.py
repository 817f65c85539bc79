"""``python -m taskexec.cli``: the taskexec command."""

from taskexec.cli import main

main()
