"""The audit trail: every prediction, from the API and the CLI, recorded before it is reported."""
