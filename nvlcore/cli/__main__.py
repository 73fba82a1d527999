"""``python -m nvlcore.cli`` = ``nvl``."""

import sys

from nvlcore.cli import main

sys.exit(main())
