"""`python -m rectok.data verify ROOT`: see rectok.data.verify."""

import sys

from rectok.data.verify import main

sys.exit(main())
