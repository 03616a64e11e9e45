import sys

from detectord.cli import main

sys.exit(main())
