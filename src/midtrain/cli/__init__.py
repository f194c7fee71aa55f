"""The `midtrain` command line. Expected failures print one clear message and exit non-zero, never a traceback.

`root` holds the app and its core verbs, one module per verb group holds the rest (`data`, `eval`, `merge`, `mix`,
`report`, `rope`), and `common` what they share; imports go root -> groups -> common and the library packages.
"""

from midtrain.cli.root import app, main

__all__ = ["app", "main"]
