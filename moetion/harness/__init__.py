"""The fault-injection harness: run a job fault-free and with real SIGKILLs, and compare bit for bit.

Submodules: :mod:`~moetion.harness.final_state` (what each rank leaves behind and the bitwise
comparison), :mod:`~moetion.harness.timeline` (a recovery's phases from the supervisor's and the
ranks' records), :mod:`~moetion.harness.runner` (the pytest-usable API and ``moetion faults``).
"""
