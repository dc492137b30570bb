"""Sub-commands of the ``mambatrim`` CLI (see :mod:`mambatrim.cli`)."""
