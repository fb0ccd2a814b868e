"""``python -m imtrial_dsl`` runs the imtrial command line."""
import sys

from .cli import main

sys.exit(main())
