"""A stand-in for torch with a fake CUDA device, for testing kvprof's torch probe on a
machine without a GPU.  Only the calls the probe makes exist.  The "device" serves the
snapshot in $FAKE_TORCH_SNAPSHOT (a real one from fixtures/torch-snapshots) and counts
what the probe asked of it.  FAKE_CUDA=0 makes torch.cuda.is_available() False."""

__version__ = "2.13.0+fake"

from . import _C, cuda  # noqa: E402,F401
