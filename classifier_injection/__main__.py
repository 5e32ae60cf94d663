"""``python -m classifier_injection``: the command line (same as ``classifier-injection``)."""

from .cli import main

raise SystemExit(main())
