import sys

from dalle.cli import main

sys.exit(main())
