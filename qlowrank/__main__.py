"""`python -m qlowrank ...`: the same entry point as the `qlowrank` script (launchers such as
`torchrun -m` and `accelerate launch -m` need a module to run)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
