"""python -m rectok.study fsd [--quick] [--out DIR] ...: see rectok.study.cli."""

from rectok.study.cli import main

raise SystemExit(main())
