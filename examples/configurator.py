"""Command-line overrides of an example's settings, nanoGPT style: a script defines its settings as module-level
names, then runs this file in its own namespace,

    exec(Path(__file__).with_name("configurator.py").read_text())

and ``python examples/ddp_finetune.py --shots=5 --lr=0.1`` replaces them. Each ``--name=value`` must name a setting
(a bool, int, float or str defined before this runs); the value is read as a Python literal if it is one, else kept
as a string.
"""

import ast
import sys

_settings = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
for _arg in sys.argv[1:]:
    _key, _eq, _value = _arg.removeprefix("--").partition("=")
    if _key not in _settings or not _eq:
        raise SystemExit(f"unknown or malformed setting {_arg!r}; use --name=value with a name from {_settings}")
    try:
        globals()[_key] = ast.literal_eval(_value)
    except (ValueError, SyntaxError):
        globals()[_key] = _value
