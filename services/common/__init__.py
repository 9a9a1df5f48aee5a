"""Pieces every service shares: addresses, errors, policy, the gRPC server skeleton."""
