import os

# An existing sitecustomize that must still run under kvprof record.
os.environ["KVPROF_TEST_SITECUSTOMIZE_RAN"] = "1"
