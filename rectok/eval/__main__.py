"""python -m rectok.eval {fid,is,stats,recon,probe} ... (see rectok/eval/cli.py)."""

from .cli import main

raise SystemExit(main())
