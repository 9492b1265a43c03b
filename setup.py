"""Package list for setuptools: the top-level hydra_configs/ ships inside the wheel as tinylora_verl.hydra_configs."""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["tinylora_verl", "tinylora_verl.*", "hydra_plugins.*"])
packages += ["tinylora_verl.hydra_configs", "tinylora_verl.hydra_configs.recipe"]

setup(packages=packages, package_dir={"tinylora_verl.hydra_configs": "hydra_configs"})
