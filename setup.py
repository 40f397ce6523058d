"""Package discovery for the directory mapping in pyproject.toml (kernels/ -> lctrain.kernels, launch/ -> lctrain.launch)."""
from setuptools import find_packages, setup

packages = find_packages(include=["lctrain", "lctrain.*"])
for top in ("kernels", "launch"):
    packages += [f"lctrain.{top}"] + [f"lctrain.{top}.{sub}" for sub in find_packages(top)]

setup(packages=packages, package_data={"lctrain.launch": ["slurm/*", "k8s/*"]})
