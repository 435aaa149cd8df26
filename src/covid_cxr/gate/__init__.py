"""The input gate: refuse what the model cannot judge (not a frontal chest radiograph)."""

from covid_cxr.gate.model import GATE_ENV, GATE_MODEL, GateResult, InputGate, gate_enabled

__all__ = ["GATE_ENV", "GATE_MODEL", "GateResult", "InputGate", "gate_enabled"]
