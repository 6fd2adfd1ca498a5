"""``python -m kernelproxy``: the command line (see ``kernelproxy._cli``)."""

from ._cli import main

raise SystemExit(main())
