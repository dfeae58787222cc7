"""The ``spvit-search`` command line: one sub-command per step of the data flow.

The group lives here; the commands are in one module per side of the data flow (``model``,
``latency``, ``training``, ``search``) and register themselves on import.
"""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="spvit-search")
def main() -> None:
    """Make vision transformers meet a device's latency budget with the least accuracy loss."""


from . import latency, model, search, training  # noqa: E402,F401  (register the commands)
