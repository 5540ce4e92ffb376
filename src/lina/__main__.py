import sys

from lina.cli import main

sys.exit(main())
