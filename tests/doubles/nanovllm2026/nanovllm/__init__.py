"""Test double of nano-vllm's 2026 engine API (see tests/doubles/README.md)."""
