"""Fleet service (registry, devices, rollouts). Arrives with the fleet issue."""
