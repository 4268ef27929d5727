import sys

from budgetpress.cli import main

sys.exit(main())
