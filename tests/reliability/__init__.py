"""The reliability and security suite: load, cancellation, isolation, faults, bad input, security, soak."""
