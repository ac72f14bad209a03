"""Deployment tests: SuperLink, SuperExec and SuperNodes as real processes, plus docker/ checks."""
