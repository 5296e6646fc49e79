"""Packages ``conf/`` (the Hydra config tree, kept at the repo's top level) as ``ssl_mt/conf``.

Everything else is declared in ``pyproject.toml``; this file only adds the mapping that
pyproject's ``packages.find`` cannot express.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ssl_mt", "ssl_mt.*"]), "ssl_mt.conf"],
    package_dir={"ssl_mt.conf": "conf"},
)
