"""`python -m convnext ...` (and `torchrun -m convnext train ...`) runs the CLI."""

import sys

from convnext.cli import main

if __name__ == "__main__":
    sys.exit(main())
