"""`Finding`: one thing the harness found wrong, with a stable signature for deduplication."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Finding:
    """A violated invariant, an illegal access or a bad launch, in one stage of one run.

    `signature` is "stage:check" (e.g. "gating:unique-ids", "finalize:illegal-access"): stable
    across runs, so findings deduplicate by it. `severity` says what kind of input produced it:
    "legal" (a bug on input the chain must handle), "out-of-contract" (a stage given input its
    predecessor can never produce) or "fault" (an injected fault upstream). `details` holds the
    offending rows or slots, JSON-ready.
    """

    stage: str
    check: str
    message: str
    severity: str = "legal"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def signature(self) -> str:
        return f"{self.stage}:{self.check}"

    def to_json(self) -> dict[str, Any]:
        return {"signature": self.signature, "stage": self.stage, "check": self.check,
                "message": self.message, "severity": self.severity, "details": self.details}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Finding:
        """The finding `to_json` wrote (its derived "signature" is recomputed, not read)."""
        return cls(obj["stage"], obj["check"], obj["message"], obj["severity"], obj["details"])

    def __str__(self) -> str:
        return f"[{self.severity}] {self.signature}: {self.message}"
