"""``python -m raytl`` is the ``raytl`` command."""

from raytl.cli import main

raise SystemExit(main())
