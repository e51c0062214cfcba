import sys

from tickq.cli import main

sys.exit(main())
