"""python -m bench.gate check RESULTS [--ceilings FILE] (bench/gate/cli.py)"""

import sys

from .cli import main

sys.exit(main())
