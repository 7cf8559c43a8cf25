"""A multi-user endpoint: a manager that runs each user's tasks as that user's own Unix account.

The administrator's files beside ``config.yaml`` are read here, one module each:
``identity`` (``identity_mapping.json``: a farcall user to a local account), ``templates``
(``user_config_template.yaml.j2`` and ``user_config_schema.json``: a user endpoint's
``config.yaml`` from the values the user sends) and ``environment``
(``user_environment.yaml``). docs/multi-user.md describes them.
"""
