"""Only what pyproject.toml cannot say: ship the .pth file that installs the torchvision import fix.

The .pth goes to the root of site-packages in regular and editable installs alike, so that
``import timm`` works before ``import spvit_search`` on CPU torch (see _spvit_torchvision_fix.py).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "spvit_search_torchvision_fix.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [str(Path(self.build_lib) / PTH.name)]
        return [*super().get_outputs(include_bytecode), *extra]


class EditableWithPth(editable_wheel):
    # setuptools writes the editable wheel from the folder passed here as `unpacked`; files put
    # there are installed at the root of site-packages. If a future setuptools renames this
    # private step, the editable install still works, only without the early import hook.
    def _run_build_commands(self, dist_name, unpacked, lib, tmp):
        result = super()._run_build_commands(dist_name, unpacked, lib, tmp)
        shutil.copyfile(PTH, Path(unpacked) / PTH.name)
        return result


cmdclass = {"build_py": BuildWithPth}
if hasattr(editable_wheel, "_run_build_commands"):
    cmdclass["editable_wheel"] = EditableWithPth

setup(cmdclass=cmdclass)
