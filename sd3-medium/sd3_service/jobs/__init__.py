"""Every request is a job with an id: the jobs this process holds, and the ledger that spans instances."""
