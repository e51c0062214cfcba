"""The producer: turns a run's parameters into a manifest and one job message per job."""
