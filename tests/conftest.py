"""The shared fixtures and the tier markers live in tests/helpers/ (plain code the tests import from there too)."""

pytest_plugins = ["helpers.fixtures", "helpers.tiers"]
