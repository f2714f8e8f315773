"""TFDS dataset builders for the paper's data, prepared offline into ``data/``.

Importing a submodule imports tensorflow-datasets; the core package never does.
"""
