from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _v

try:
    __version__ = _v("ssl_mt")
except PackageNotFoundError:  # imported from a checkout through PYTHONPATH, not installed
    __version__ = "0+unknown"
