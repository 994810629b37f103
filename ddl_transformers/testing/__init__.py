"""Test utilities for ``ddl_transformers``.

Nothing in this package is used by the library itself: it holds helpers for the test-suite, such as
:mod:`ddl_transformers.testing.hub_standin`, a local stand-in of the Hugging Face Hub HTTP API that lets tests drive
the real ``huggingface_hub`` / ``transformers`` clients without network access.
"""
