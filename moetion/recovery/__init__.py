"""Localized recovery: the plan every rank agrees on, the transfers it needs, and one rank's side of it."""
from moetion.recovery.coordinator import Recovery
from moetion.recovery.plan import RankStatus, RecoveryImpossible, RecoveryPlan, Restore, plan_recovery

__all__ = ["RankStatus", "Recovery", "RecoveryImpossible", "RecoveryPlan", "Restore", "plan_recovery"]
