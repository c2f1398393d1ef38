"""Tools for testing pipelines: the fault-injecting LM now; strategies, invariants and a pytest plugin later."""

from resilient_dspy.testing.fault_lm import Fault, FaultInjectingLM, FaultProfile, JournalEntry

__all__ = ["Fault", "FaultInjectingLM", "FaultProfile", "JournalEntry"]
