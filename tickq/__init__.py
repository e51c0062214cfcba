"""tickq: questions over years of monthly market-data files, as distributed runs."""
