"""Multi-user endpoints (docs/multi-user.md): a manager that starts a user endpoint, as each
submitter's own Unix account, from its identity mapping and per-user configuration template."""
