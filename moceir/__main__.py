import sys

from moceir.cli import main

sys.exit(main())
