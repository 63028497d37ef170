import sys

from fedward.cli import main

sys.exit(main())
