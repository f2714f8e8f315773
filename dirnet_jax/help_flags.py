"""What a command's --help lists: absl shows the flags of the module it runs as (sys.argv[0]),
so flags defined in a shared module (the experiments' run flags, the compile cache's) were
listed by --helpfull only, among absl's and JAX's."""

from __future__ import annotations

import sys

from absl import flags


def list_in_help(*modules: str) -> None:
    """Make the flags defined in these modules (by `__name__`) part of the running command's
    --help (--helpshort)."""
    by_module = flags.FLAGS.flags_by_module_dict()
    for module in modules:
        for flag in by_module.get(module, []):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
