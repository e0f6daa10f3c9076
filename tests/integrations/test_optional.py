"""The integrations are optional extras: their modules import without Lightning / transformers, and using a class
then says what to install."""

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_integrations_import_without_the_frameworks():
    code = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning", "transformers"):
                    raise ImportError(f"blocked {name}")

        sys.meta_path.insert(0, Block())
        import ptyl.integrations.huggingface as hf
        import ptyl.integrations.lightning as lit
        from ptyl.errors import ConfigError
        for module, name, extra in ((lit, "PriorCallback", "lightning"), (hf, "PriorTrainer", "hf")):
            try:
                getattr(module, name)
            except ConfigError as err:
                assert f"ptyl[{extra}]" in str(err), err
            else:
                raise AssertionError(f"{name} without its framework")
        assert hf.PriorTrainerMixin  # a plain mixin: no framework needed to define it
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
