"""Builders and runners shared by the tests (imported as `helpers.cli`, `helpers.models`)."""
