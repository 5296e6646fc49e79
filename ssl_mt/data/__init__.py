"""Dataset format, synthetic generator, transforms, datasets and datamodules.

CLI: ``python -m ssl_mt.data {generate,check,preview,prepare}``.
"""
