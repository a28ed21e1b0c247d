"""Pseudo-labelling: corpus readers, the sharded resumable job, and its bad-input reports."""
