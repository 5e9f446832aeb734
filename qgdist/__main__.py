"""``python -m qgdist`` and the ``qgdist`` console script."""

import sys


def console() -> int:
    """Run the command line as a command: first under the chosen allocator (qgdist.core.allocator)."""
    from qgdist.core.allocator import run_with_chosen_allocator

    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    run_with_chosen_allocator(command)   # before the heavy imports: it may exec this command again
    from qgdist.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(console())
