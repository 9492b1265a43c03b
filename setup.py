"""Package list for setuptools.

``hydra_configs/`` lives at the top of the repository and is linked into the package as
``tinylora_verl/hydra_configs`` (a relative symlink), so ``pkg://tinylora_verl.hydra_configs`` resolves from the
source tree, an editable install and a wheel alike; the wheel build copies the linked files.
"""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["tinylora_verl", "tinylora_verl.*", "hydra_plugins.*"]))
