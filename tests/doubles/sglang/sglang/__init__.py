"""A test double of SGLang's memory layer (see tests/doubles/README.md): the API shape and
block-state rules kvprof's SGLang adapter relies on, with numpy arrays for tensors."""

__version__ = "0.0.test"
