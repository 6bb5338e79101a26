"""hooks.d: drop-in scripts run in a clone after cloning (Ganeti's hooks contract)."""
