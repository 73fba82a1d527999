"""``python -m nvlcore`` = ``nvl``."""

import sys

from nvlcore.cli import main

sys.exit(main())
