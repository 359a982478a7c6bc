"""python -m bench.report.quotes check | write | list [FILE ...]"""

import sys

from .markers import main

sys.exit(main())
