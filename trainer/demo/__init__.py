"""The CPU quickstart: builds a two-domain corpus from the Python standard library
(`corpus.py`), then runs data_prep, pretraining, the four extensions, export and report
through the same commands as a cluster run (`cli.py`). Its YAMLs live in `configs/`."""
