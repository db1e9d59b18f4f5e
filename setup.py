"""Packaging beside pyproject.toml (which holds the metadata): ``serve_configs/`` at the top level
is the user-facing copy of the Serve configs and their one source; the wheel ships it as the
package data ``atspeed_ray/serve_configs/*.yaml``, so ``atspeed-ray serve`` finds its default
config in a regular (non-editable) install too. pyproject.toml cannot map a folder outside the
package into it while also discovering the packages, hence this file."""

from setuptools import find_packages, setup

CONFIGS = "atspeed_ray.serve_configs"

setup(
    packages=[*find_packages(include=["atspeed_ray*"]), CONFIGS],
    package_dir={CONFIGS: "serve_configs"},
    package_data={CONFIGS: ["*.yaml"]},
)
