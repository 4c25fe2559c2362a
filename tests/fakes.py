"""The fake engine, for tests: it lives in daemon/fake_engine.py (`--engine fake` uses it too)."""

from daemon.fake_engine import FakeEngine, FakeEngineError, FakeGeneration

__all__ = ["FakeEngine", "FakeEngineError", "FakeGeneration"]
