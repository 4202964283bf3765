import sys

from memtrans.cli import main

sys.exit(main())
